#![allow(clippy::unwrap_used)]
//! Commit metadata written by another client is untrusted input. rdkafka panics on
//! metadata that is not UTF-8, and the runtime reads committed metadata inside its
//! rebalance callback, where a panic aborts the process: one bad commit by any client
//! would kill every member of the group at its next assignment.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use decaton_integration_tests::put_tasks;
use decaton_processor::{ProcessError, ProcessingContext, Subscription, TaskProcessor};
use decaton_protocol::ChatOp;
use decaton_testkit::{BrokerKind, TestBroker};
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};

struct Offsets(Arc<Mutex<Vec<i64>>>);

#[async_trait]
impl TaskProcessor<ChatOp> for Offsets {
    async fn process(&self, ctx: &ProcessingContext, _task: ChatOp) -> Result<(), ProcessError> {
        self.0.lock().push(ctx.offset());
        Ok(())
    }
}

/// Commits `offset` for `group` with metadata bytes that are not UTF-8, through
/// librdkafka's C API (rdkafka's safe API only takes `&str`).
#[allow(unsafe_code)]
fn commit_raw_metadata(bootstrap: &str, group: &str, topic: &str, offset: i64, bytes: &[u8]) {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Offset(offset))
        .unwrap();
    // SAFETY: the list has one element; librdkafka frees `metadata` with the list, so it
    // is allocated with malloc, as rdkafka's own `set_metadata` does.
    unsafe {
        let list = &mut *tpl.ptr();
        let elem = &mut *list.elems;
        let buf = libc::malloc(bytes.len());
        assert!(!buf.is_null());
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), bytes.len());
        elem.metadata = buf;
        elem.metadata_size = bytes.len();
    }
    consumer.commit(&tpl, CommitMode::Sync).unwrap();
}

/// A committed position whose metadata is not UTF-8 is used as a plain position: the
/// subscription starts there and processes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_commit_metadata_is_ignored() {
    let broker = TestBroker::start(BrokerKind::Embedded).unwrap();
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("foreign", 1).unwrap();
    put_tasks(&bootstrap, &[], "foreign", 0..10, 10)
        .await
        .unwrap();
    commit_raw_metadata(&bootstrap, "foreign", "foreign", 4, &[0xff, 0xfe, 0x80]);

    let seen = Arc::new(Mutex::new(Vec::new()));
    let sub = Subscription::builder("foreign", Offsets(seen.clone()))
        .bootstrap_servers(&bootstrap)
        .topic("foreign")
        .build()
        .unwrap();
    let handle = sub.handle();
    let run = tokio::spawn(sub.run());
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.lock().len() < 6 {
        assert!(
            Instant::now() < deadline,
            "only {:?} processed",
            seen.lock()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handle.shutdown();
    run.await.unwrap().unwrap();
    let mut offsets = seen.lock().clone();
    offsets.sort();
    assert_eq!(offsets, (4..10).collect::<Vec<i64>>());
}
