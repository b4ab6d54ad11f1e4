//! Test support for decaton-rs: brokers to run against and a checker for the properties
//! the framework promises.
//!
//! * [`TestBroker`] is one handle over both brokers the project tests against: the
//!   **embedded** librdkafka mock cluster, running in this process, and a real **Tansu**
//!   broker process on a free loopback port (in-memory storage for volume, or an sqlite
//!   file that survives [`TestBroker::restart`]). Tests take a [`BrokerKind`] parameter so
//!   the same scenario runs against each.
//! * [`checker`] verifies a log of processed tasks: every task processed, per-key order
//!   kept, duplicates counted.
//! * [`wait_until`] waits for a condition with a deadline instead of sleeping.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod broker;
pub mod checker;
mod wait;

pub use broker::{tansu_binary, BrokerKind, TestBroker, TestkitError};
pub use checker::{CheckReport, Processed};
pub use wait::wait_until;
