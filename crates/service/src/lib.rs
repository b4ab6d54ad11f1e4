//! Run decaton-rs processors as services.
//!
//! A team's `main` loads a [`ServiceConfig`] (a TOML file plus `DECATON_` environment
//! overrides), starts a [`Service`], adds its subscriptions and runs it:
//!
//! - configuration: Decaton properties by either name (`decaton.partition.concurrency`
//!   or `partition_concurrency`) next to librdkafka settings passed through verbatim;
//!   an unknown key is an error naming the key and its line ([`config`]);
//! - HTTP on the configured address (loopback by default): `GET /metrics` (Prometheus
//!   text; every metric with help text and unit, histograms with buckets),
//!   `GET /health/live` and `GET /health/ready` (503 with the reason per partition);
//! - SIGTERM / SIGINT drain every subscription within its shutdown timeout; a second
//!   signal exits at once; the exit code says which ([`ServiceExit`]);
//! - logs as text or JSON; inside `process`, every line carries the task's subscription,
//!   topic, partition, offset, key and retry count;
//! - per-partition consumer lag (`decaton_consumer_lag`) read from the broker;
//! - with the `otel` feature and `otlp_endpoint`, spans exported to an OpenTelemetry
//!   collector, each task's span continuing its producer's `traceparent`.
//!
//! Each processor should run as its own service — its own process, consumer group and
//! metrics port — so one whose storage is down falls behind alone and says so on its
//! readiness endpoint.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod config;
mod health;
mod http;
mod lag;
mod logging;
pub mod metrics;
#[cfg(feature = "otel")]
mod otel;
mod service;
mod signals;

pub use config::{ConfigError, LogFormat, ServiceConfig, ServiceSettings, SubscriptionConfig};
pub use service::{Service, ServiceError, ServiceExit};
