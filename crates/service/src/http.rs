//! The service's HTTP endpoint: `GET /metrics`, `GET /health/live`, `GET /health/ready`.
//!
//! Served by hyper's HTTP/1 server on the configured address, the same hyper the
//! Prometheus exporter is built on (the exporter's own listener serves only its metrics
//! and cannot host the health routes). Connections are capped and each has a deadline, so
//! a slow or hostile client cannot hold the service's memory or sockets.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::ServiceSettings;
use crate::health::{self, Hosted};

/// Connections served at once; further ones are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// Longest time one connection is served.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);

/// What the handlers read.
pub(crate) struct Endpoint {
    pub(crate) metrics: PrometheusHandle,
    pub(crate) hosted: Vec<Arc<Hosted>>,
    pub(crate) settings: ServiceSettings,
}

/// Serves until the task is aborted.
pub(crate) async fn serve(listener: TcpListener, endpoint: Arc<Endpoint>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors or similar: back off instead of spinning.
                tracing::warn!("http accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("too many http connections; one refused");
            continue;
        };
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let endpoint = endpoint.clone();
                async move { Ok::<_, Infallible>(route(&endpoint, &req)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, connection).await;
            drop(slot);
        });
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

fn verdict(v: health::Verdict, ok: &str) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if v.ok() {
        text(StatusCode::OK, PLAIN, format!("{ok}\n"))
    } else {
        let mut body = String::new();
        for r in &v.reasons {
            body.push_str(r);
            body.push('\n');
        }
        text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, body)
    }
}

fn route(endpoint: &Endpoint, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "only GET\n".to_string(),
        );
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            endpoint.metrics.render(),
        ),
        "/health/live" => verdict(
            health::liveness(&endpoint.hosted, &endpoint.settings),
            "live",
        ),
        "/health/ready" => verdict(
            health::readiness(&endpoint.hosted, &endpoint.settings),
            "ready",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: try /metrics, /health/live or /health/ready\n".to_string(),
        ),
    }
}
