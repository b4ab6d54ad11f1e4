//! The harness end to end on the embedded mock cluster: a tiny matrix produces a JSON
//! report and a PNG chart that decode; single runs and the producer comparison produce
//! figures that make sense.

use std::time::Duration;

use decaton_bench::{
    run_bench, run_matrix, run_produce, BenchConfig, MatrixConfig, MatrixReport, ProduceConfig,
    ProducerKind, RunnerKind, RunnerSpec, Workload,
};

fn tiny(tasks: u64, warmup: u64) -> Workload {
    Workload {
        tasks,
        warmup,
        partitions: 3,
        stall_timeout: Duration::from_secs(30),
        ..Workload::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_matrix_writes_json_and_a_png_chart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = MatrixConfig {
        latencies_ms: vec![0, 2],
        runners: vec![RunnerSpec::new(RunnerKind::RdkafkaSerial)],
        workload: tiny(300, 30),
        out_dir: dir.path().join("out"),
    };
    let report = run_matrix(&config).await?;
    assert_eq!(report.entries.len(), 2);

    // The JSON parses back into the report.
    let json: MatrixReport = serde_json::from_str(&std::fs::read_to_string(&report.json_path)?)?;
    assert_eq!(json.latencies_ms, vec![0, 2]);
    assert_eq!(json.runners, vec!["rdkafka-serial".to_string()]);
    for e in &json.entries {
        assert_eq!(e.summary.tasks, 300);
        assert!(e.summary.throughput_per_sec > 0.0);
        assert!(
            e.command
                .starts_with("decaton bench --runner rdkafka-serial"),
            "{}",
            e.command
        );
    }
    let slow = json
        .entry("rdkafka-serial", 2)
        .ok_or_else(|| anyhow::anyhow!("no 2 ms cell"))?;
    assert_eq!(slow.summary.ideal_throughput_per_sec, Some(1500.0));
    assert!(json
        .entry("rdkafka-serial", 0)
        .is_some_and(|e| e.summary.pct_of_ideal.is_none()));

    // The PNG decodes to a non-empty image.
    let decoder = png::Decoder::new(std::fs::File::open(dir.path().join("out/matrix.png"))?);
    let mut reader = decoder.read_info()?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf)?;
    assert!(frame.width > 100 && frame.height > 100);
    let pixels = &buf[..frame.buffer_size()];
    assert!(pixels.iter().any(|&b| b != pixels[0]), "the image is blank");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_baseline_stays_under_its_ideal() -> anyhow::Result<()> {
    let config = BenchConfig {
        runner: RunnerSpec::new(RunnerKind::RdkafkaSerial),
        simulate_latency: Duration::from_millis(10),
        workload: tiny(300, 30),
    };
    let report = run_bench(&config).await?;
    let f = report.summary;
    assert_eq!(f.ideal_throughput_per_sec, Some(300.0));
    let pct = f
        .pct_of_ideal
        .ok_or_else(|| anyhow::anyhow!("no % of ideal"))?;
    // Each partition runs one 10 ms task at a time: never faster than ideal (give or take
    // the tasks already running when the window opens), and not far below it.
    assert!((30.0..=105.0).contains(&pct), "{pct}% of ideal");
    assert!(f.latency_ms.max >= f.latency_ms.p99 && f.latency_ms.p99 >= f.latency_ms.p50);
    assert!(f.peak_rss_kib > 0);
    assert!(report
        .to_text()
        .contains("reproduce: decaton bench --runner rdkafka-serial"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_consumer_and_producers_report_figures() -> anyhow::Result<()> {
    let raw = run_bench(&BenchConfig {
        runner: RunnerSpec::new(RunnerKind::RdkafkaRaw),
        simulate_latency: Duration::ZERO,
        workload: tiny(2_000, 200),
    })
    .await?;
    assert_eq!(raw.summary.tasks, 2_000);
    assert!(raw.summary.throughput_per_sec > 0.0);
    assert_eq!(raw.summary.pct_of_ideal, None);

    let produced = run_produce(&ProduceConfig {
        producers: vec![ProducerKind::Put, ProducerKind::RawProducer],
        workload: Workload {
            keys: decaton_bench::Keys::Distinct(10),
            ..tiny(1_000, 100)
        },
    })
    .await?;
    assert_eq!(produced.len(), 2);
    assert_eq!(produced[0].name, "put");
    assert_eq!(produced[1].name, "raw-producer");
    for p in &produced {
        assert!(p.summary.throughput_per_sec > 0.0);
        assert!(p
            .command
            .starts_with(&format!("decaton bench produce --producer {}", p.name)));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_rdkafka_params_are_rejected() -> anyhow::Result<()> {
    let err = run_bench(&BenchConfig {
        runner: RunnerSpec::new(RunnerKind::RdkafkaRaw).param("no.such.setting", "1"),
        simulate_latency: Duration::ZERO,
        workload: tiny(10, 0),
    })
    .await
    .err()
    .ok_or_else(|| anyhow::anyhow!("accepted an unknown setting"))?;
    assert!(err.to_string().contains("no.such.setting"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decaton_runner_uses_its_lanes() -> anyhow::Result<()> {
    let config = BenchConfig {
        runner: RunnerSpec::new(RunnerKind::Decaton)
            .param("mode", "bounded")
            .param("partition_concurrency", "4"),
        simulate_latency: Duration::from_millis(5),
        workload: tiny(600, 60),
    };
    let report = run_bench(&config).await?;
    let f = report.summary;
    assert_eq!(report.lanes, Some(4));
    assert_eq!(f.ideal_throughput_per_sec, Some(2_400.0));
    let pct = f
        .pct_of_ideal
        .ok_or_else(|| anyhow::anyhow!("no % of ideal"))?;
    // Four lanes per partition: well above what one lane could do (25%), never above ideal.
    assert!((30.0..=105.0).contains(&pct), "{pct}% of ideal");
    assert!(
        report
            .command
            .contains("--param mode=bounded --param partition_concurrency=4"),
        "{}",
        report.command
    );
    Ok(())
}
