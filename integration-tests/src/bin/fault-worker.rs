//! A processor instance for the fault tests: runs one subscription and appends
//! `{"key","sequence","instance"}` to `<log-dir>/<instance>.jsonl` for every task, with one
//! write per task so a SIGKILL loses nothing that was processed. SIGTERM shuts it down
//! gracefully.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use decaton_processor::{
    async_trait, ProcessError, ProcessingContext, ProcessorProperties, Subscription, TaskProcessor,
};
use decaton_protocol::ChatOp;
use parking_lot::Mutex;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    bootstrap: String,
    #[arg(long)]
    topic: String,
    #[arg(long)]
    group: String,
    #[arg(long)]
    instance: String,
    #[arg(long)]
    log_dir: std::path::PathBuf,
    /// Runtime properties, name=value.
    #[arg(long = "param")]
    params: Vec<String>,
    /// librdkafka settings, key=value.
    #[arg(short = 'X')]
    kafka: Vec<String>,
    /// Keep per-user counters in a sled state store under this directory.
    #[arg(long)]
    state_dir: Option<std::path::PathBuf>,
    /// Processing time per task in milliseconds (random 0..=N).
    #[arg(long, default_value_t = 1)]
    latency_ms: u64,
    /// Fail every task whose sequence is a multiple of N on its first delivery, asking
    /// for a retry through `<topic>-retry` (which must exist); only successful runs are
    /// logged.
    #[arg(long)]
    retry_every: Option<u64>,
    /// Process in batches of up to N tasks (lingering 20 ms), each logged then completed.
    #[arg(long)]
    batch: Option<usize>,
}

struct JsonlRecorder {
    instance: String,
    out: Mutex<std::fs::File>,
    latency_ms: u64,
    retry_every: Option<u64>,
}

#[async_trait]
impl TaskProcessor<ChatOp> for JsonlRecorder {
    async fn process(&self, ctx: &ProcessingContext, task: ChatOp) -> Result<(), ProcessError> {
        if let Some(n) = self.retry_every {
            if task.sequence % n == 0 && ctx.metadata().retry_count == 0 {
                return Err(ProcessError::retry("first delivery of this task fails"));
            }
        }
        let line = serde_json::to_string(&decaton_testkit::Processed {
            key: task.user_id,
            sequence: task.sequence,
            instance: self.instance.clone(),
        })?;
        self.out.lock().write_all(format!("{line}\n").as_bytes())?;
        if self.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(rand::random_range(
                0..=self.latency_ms,
            )))
            .await;
        }
        Ok(())
    }
}

/// Logs every task of a batch with one write, then completes them.
struct BatchLogger {
    instance: String,
    out: Mutex<std::fs::File>,
}

#[async_trait]
impl decaton_processor::BatchProcessor<ChatOp> for BatchLogger {
    async fn process_batch(&self, batch: Vec<decaton_processor::BatchedTask<ChatOp>>) {
        let mut lines = String::new();
        for t in &batch {
            if let Ok(line) = serde_json::to_string(&decaton_testkit::Processed {
                key: t.task.user_id.clone(),
                sequence: t.task.sequence,
                instance: self.instance.clone(),
            }) {
                lines.push_str(&line);
                lines.push('\n');
            }
        }
        if self.out.lock().write_all(lines.as_bytes()).is_err() {
            for t in batch {
                t.fail("could not write the log");
            }
            return;
        }
        for t in batch {
            t.complete();
        }
    }
}

fn split(kv: &str) -> anyhow::Result<(&str, &str)> {
    kv.split_once('=')
        .ok_or_else(|| anyhow::anyhow!("expected key=value, got {kv}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    decaton_integration_tests::init_tracing();
    let args = Args::parse();
    let mut props = ProcessorProperties::default();
    for p in &args.params {
        let (k, v) = split(p)?;
        props.set(k, v)?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.log_dir.join(format!("{}.jsonl", args.instance)))?;
    if let Some(capacity) = args.batch {
        let batches = BatchLogger {
            instance: args.instance.clone(),
            out: Mutex::new(out),
        };
        return run(
            Subscription::builder(
                args.group.clone(),
                decaton_processor::Batching::new(batches, capacity, Duration::from_millis(20)),
            ),
            &args,
            props,
        )
        .await;
    }
    match args.state_dir.clone() {
        None => {
            let recorder = JsonlRecorder {
                instance: args.instance.clone(),
                out: Mutex::new(out),
                latency_ms: args.latency_ms,
                retry_every: args.retry_every,
            };
            run(
                Subscription::builder(args.group.clone(), recorder),
                &args,
                props,
            )
            .await
        }
        Some(dir) => {
            let counter = decaton_integration_tests::CounterProcessor {
                log: Some((args.instance.clone(), Arc::new(Mutex::new(out)))),
                seen: Default::default(),
            };
            let cfg = decaton_state::StateConfig {
                state_dir: dir,
                ..Default::default()
            };
            run(
                Subscription::builder(args.group.clone(), counter).state_store(cfg),
                &args,
                props,
            )
            .await
        }
    }
}

async fn run<P: TaskProcessor<ChatOp>>(
    builder: decaton_processor::SubscriptionBuilder<ChatOp, P>,
    args: &Args,
    props: ProcessorProperties,
) -> anyhow::Result<()> {
    let mut builder = builder
        .bootstrap_servers(&args.bootstrap)
        .topic(&args.topic)
        .properties(props);
    for kv in &args.kafka {
        let (k, v) = split(kv)?;
        builder = builder.set(k, v);
    }
    if args.retry_every.is_some() {
        builder = builder.retry(decaton_processor::RetryConfig::new().backoff(
            decaton_processor::Backoff::fixed(Duration::from_millis(300)),
        ));
    }
    let sub = builder.build()?;
    let handle = sub.handle();
    let h = Arc::new(handle.clone());
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        h.shutdown();
    });
    let stats = sub.run().await?;
    eprintln!("{}: {stats:?}", args.instance);
    Ok(())
}
