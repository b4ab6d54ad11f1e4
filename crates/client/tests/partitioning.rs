//! Keyed tasks land where a Java producer would put them (Kafka's murmur2 partitioner).

use decaton_client::TaskClient;
use decaton_protocol::{ChatOp, OpType};
use decaton_testkit::{BrokerKind, TestBroker};
use futures::StreamExt;

/// Kafka's `Utils.murmur2` (Java), with its 32-bit wrapping arithmetic and unsigned shifts.
fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    // Java computes `seed ^ length` on ints; the length fits in 32 bits for any key.
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    // Java's switch falls through from case 3 to case 1; only case 1 multiplies.
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// Java's `Utils.toPositive(murmur2(key)) % partitions`.
fn java_partition(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}

#[test]
fn murmur2_matches_kafka_test_vectors() {
    // Kafka's UtilsTest.testMurmur2.
    let cases: [(&[u8], i32); 6] = [
        (b"21", -973_932_308),
        (b"foobar", -790_332_482),
        (b"a-little-bit-long-string", -985_981_536),
        (b"a-little-bit-longer-string", -1_486_304_829),
        (
            b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58_897_971,
        ),
        (b"abc", 479_470_107),
    ];
    for (key, expected) in cases {
        assert_eq!(
            murmur2(key),
            expected,
            "murmur2({:?})",
            String::from_utf8_lossy(key)
        );
    }
}

fn task(i: usize) -> ChatOp {
    ChatOp {
        user_id: format!("user-{i}"),
        op: OpType::SendMessage as i32,
        sequence: i as u64,
        ..Default::default()
    }
}

/// Puts one task for each of `keys` distinct keys and returns (key, partition) as acknowledged.
async fn put_keys(client: &TaskClient<ChatOp>, keys: usize) -> anyhow::Result<Vec<(String, i32)>> {
    let results: Vec<_> = futures::stream::iter(0..keys)
        .map(|i| async move {
            let t = task(i);
            let delivered = client.put(t.user_id.clone(), &t).await?;
            Ok::<_, anyhow::Error>((t.user_id, delivered.partition))
        })
        .buffer_unordered(256)
        .collect()
        .await;
    results.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_land_in_the_java_murmur2_partition() -> anyhow::Result<()> {
    const PARTITIONS: i32 = 6;
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    broker.create_topic("java-placed", PARTITIONS)?;
    let client =
        TaskClient::<ChatOp>::builder(broker.bootstrap_servers(), "java-placed").build()?;
    let placed = put_keys(&client, 1_000).await?;
    assert_eq!(placed.len(), 1_000);
    let mut per_partition = [0usize; PARTITIONS as usize];
    for (key, partition) in &placed {
        assert_eq!(
            *partition,
            java_partition(key.as_bytes(), PARTITIONS),
            "key {key}"
        );
        per_partition[*partition as usize] += 1;
    }
    // Every partition is used: the keys were not all sent to one place by accident.
    assert!(per_partition.iter().all(|&n| n > 0), "{per_partition:?}");
    client.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_partitioner_overrides_the_default() -> anyhow::Result<()> {
    const PARTITIONS: i32 = 6;
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    broker.create_topic("crc-placed", PARTITIONS)?;
    // librdkafka's own default (CRC32) places many keys elsewhere than murmur2 does.
    let client = TaskClient::<ChatOp>::builder(broker.bootstrap_servers(), "crc-placed")
        .set("partitioner", "consistent_random")
        .build()?;
    let placed = put_keys(&client, 200).await?;
    let differing = placed
        .iter()
        .filter(|(key, p)| *p != java_partition(key.as_bytes(), PARTITIONS))
        .count();
    assert!(
        differing > 50,
        "only {differing} of 200 keys placed differently"
    );
    client.close().await?;
    Ok(())
}
