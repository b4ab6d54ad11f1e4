//! Examples for decaton-rs: a chat service's background tasks on Kafka.
//!
//! A chat server (`talk-server`) turns every user action — sending a message, reading,
//! joining a room — into a [`ChatOp`](decaton_protocol::ChatOp) task keyed by the user id,
//! so one user's operations land in one partition, in order. Independent processors each
//! subscribe to the same topic with their own subscription (consumer group), so a slow
//! one never holds the others back:
//!
//! | binary                        | module            | shows                                      |
//! |-------------------------------|-------------------|--------------------------------------------|
//! | `talk-server`                 | [`chat`]          | producing keyed, sequenced tasks, rate limit |
//! | `notification-processor`      | [`notification`]  | `per_key` mode, async I/O per task         |
//! | `search-indexer`              | [`indexer`]       | `bounded` mode, deferred completion        |
//! | `storage-mutation-processor`  | [`storage`]       | per-key order as a correctness property    |
//! | `user-counters`               | [`counters`]      | partition-local state with a changelog     |
//! | `quickstart`                  | [`recording`]     | everything at once on an embedded broker   |
//!
//! Every processor binary runs as a service (`decaton-service`): its own process,
//! consumer group and metrics port, configured by its file in `examples/config/`. The
//! [`cli`] module holds what the binaries share: logging, signals, `key=value` parsing and
//! starting a service from `--config`.

pub mod chat;
pub mod cli;
pub mod counters;
pub mod indexer;
pub mod notification;
pub mod recording;
pub mod storage;
