//! With the `otel` feature, a service exports its task spans over OTLP/HTTP, and a task
//! put inside a trace is exported as a child of the producer's span, in its trace.
//!
//! `cargo test -p decaton-examples --features otel --test otel`

#![cfg(feature = "otel")]

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, metric_sum, ServiceProcess};
use decaton_client::{PutOptions, TaskClient};
use decaton_examples::chat::ChatOpGenerator;
use decaton_protocol::{ChatOp, TraceParent};
use decaton_testkit::{BrokerKind, TestBroker};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use prost::Message as _;

const TOPIC: &str = "chat-ops";
const SUBSCRIPTION: &str = "storage-mutation-processor";
const TASKS: u64 = 20;

/// The parts of OTLP's `ExportTraceServiceRequest` this test reads.
mod otlp {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExportTraceServiceRequest {
        #[prost(message, repeated, tag = "1")]
        pub resource_spans: Vec<ResourceSpans>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResourceSpans {
        #[prost(message, repeated, tag = "2")]
        pub scope_spans: Vec<ScopeSpans>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScopeSpans {
        #[prost(message, repeated, tag = "2")]
        pub spans: Vec<Span>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Span {
        #[prost(bytes = "vec", tag = "1")]
        pub trace_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub span_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "4")]
        pub parent_span_id: Vec<u8>,
        #[prost(string, tag = "5")]
        pub name: String,
    }
}

/// A collector that keeps every span it receives (at most 100k).
async fn collector() -> anyhow::Result<(std::net::SocketAddr, Arc<Mutex<Vec<otlp::Span>>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let spans: Arc<Mutex<Vec<otlp::Span>>> = Arc::default();
    let kept = spans.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let kept = kept.clone();
                        async move {
                            if req.uri().path() == "/v1/traces" {
                                let body = req.into_body().collect().await?.to_bytes();
                                if let Ok(r) = otlp::ExportTraceServiceRequest::decode(body) {
                                    let mut kept = kept.lock();
                                    for span in r
                                        .resource_spans
                                        .into_iter()
                                        .flat_map(|r| r.scope_spans)
                                        .flat_map(|s| s.spans)
                                    {
                                        if kept.len() < 100_000 {
                                            kept.push(span);
                                        }
                                    }
                                }
                            }
                            Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::new())))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
        Ok::<_, Infallible>(())
    });
    Ok((addr, spans))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_spans_are_exported_in_the_producers_trace() -> anyhow::Result<()> {
    let (collector_addr, spans) = collector().await?;
    let broker = tokio::task::spawn_blocking(|| -> anyhow::Result<TestBroker> {
        let broker = TestBroker::start(BrokerKind::Embedded)?;
        broker.create_topic(TOPIC, 1)?;
        Ok(broker)
    })
    .await??;
    let bootstrap = broker.bootstrap_servers();
    let trace = TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .ok_or_else(|| anyhow::anyhow!("bad traceparent"))?;
    let client = TaskClient::<ChatOp>::builder(bootstrap.clone(), TOPIC).build()?;
    let mut chat = ChatOpGenerator::new(5, 1);
    for _ in 0..TASKS {
        let op = chat.next_op();
        client
            .put_with(
                op.user_id.clone(),
                &op,
                PutOptions::default().traceparent(trace),
            )
            .await?;
    }
    client.close().await?;

    let config = common::config_file(SUBSCRIPTION);
    let service = ServiceProcess::start(
        SUBSCRIPTION,
        env!("CARGO_BIN_EXE_storage-mutation-processor"),
        &["--config", config.to_str().unwrap_or_default()],
        &[
            ("DECATON_KAFKA__BOOTSTRAP_SERVERS", bootstrap),
            (
                "DECATON_SERVICE__OTLP_ENDPOINT",
                format!("http://{collector_addr}"),
            ),
            (
                "DECATON_SERVICE__LOG_FILTER",
                "info,librdkafka=off,rdkafka::client=off".into(),
            ),
        ],
    )?;
    eventually(Duration::from_secs(60), "all processed", || async {
        let (_, text) = service.get("/metrics").await?;
        let n = metric_sum(
            &text,
            "decaton_tasks_processed_total",
            &format!("subscription=\"{SUBSCRIPTION}\""),
        );
        Ok((n >= TASKS as f64).then_some(()))
    })
    .await?;
    // Stopping flushes the exporter.
    service.signal("TERM")?;
    let (status, _) = service.wait(Duration::from_secs(60))?;
    assert_eq!(status.code(), Some(0));

    let spans = spans.lock();
    let tasks: Vec<&otlp::Span> = spans.iter().filter(|s| s.name == "task").collect();
    assert_eq!(
        tasks.len() as u64,
        TASKS,
        "task spans exported: {}",
        spans.len()
    );
    for span in tasks {
        assert_eq!(span.trace_id, trace.trace_id, "in the producer's trace");
        assert_eq!(
            span.parent_span_id, trace.parent_id,
            "a child of the producer's span"
        );
        assert_ne!(span.span_id, trace.parent_id);
    }
    Ok(())
}
