//! The runner: hosts subscriptions in one process until a signal stops them.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use decaton_processor::{
    Subscription, SubscriptionBuilder, SubscriptionError, SubscriptionStats, TaskProcessor,
};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::config::{ServiceConfig, SubscriptionConfig};
use crate::health::{self, Hosted};
use crate::http::{self, Endpoint};
use crate::lag;
use crate::logging::LoggingGuard;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] crate::ConfigError),
    /// The metrics recorder, the HTTP listener or a subscription could not be set up.
    #[error("{0}")]
    Start(String),
}

/// How the service ended; [`ServiceExit::code`] is the process exit code.
///
/// | code | meaning |
/// |---|---|
/// | 0 | stopped by SIGTERM or SIGINT; every subscription drained, committed and left its group |
/// | 1 | a subscription failed (or could not start); the others were shut down gracefully |
/// | 3 | stopped by a signal, but tasks were still running at `shutdown_timeout`: they were abandoned, nothing above them committed, and they run again on the next owner |
/// | 130, 143 | a second SIGINT (130) or SIGTERM (143) during the drain: exited at once, without the final commits (the next owner runs the uncommitted tasks again) |
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServiceExit {
    /// Stopped by a signal; everything drained.
    Drained,
    /// Stopped by a signal; this many tasks were abandoned at the shutdown timeout.
    Incomplete {
        /// Tasks abandoned during the drain.
        abandoned: u64,
    },
    /// A subscription failed.
    Failed(String),
}

impl ServiceExit {
    /// The process exit code (see the table on [`ServiceExit`]).
    pub fn code(&self) -> u8 {
        match self {
            ServiceExit::Drained => 0,
            ServiceExit::Failed(_) => 1,
            ServiceExit::Incomplete { .. } => 3,
        }
    }

    /// [`Self::code`] as an [`ExitCode`] to return from `main`.
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.code())
    }
}

type RunFuture = Pin<Box<dyn Future<Output = Result<SubscriptionStats, SubscriptionError>> + Send>>;

struct Added {
    hosted: Arc<Hosted>,
    run: RunFuture,
}

/// A process hosting one or more subscriptions, configured from a [`ServiceConfig`].
///
/// ```no_run
/// # use decaton_processor::*;
/// # use decaton_protocol::ChatOp;
/// # struct Noop;
/// # #[async_trait] impl TaskProcessor<ChatOp> for Noop {
/// #   async fn process(&self, _: &ProcessingContext, _: ChatOp) -> Result<(), ProcessError> { Ok(()) } }
/// use decaton_service::{Service, ServiceConfig};
///
/// #[tokio::main]
/// async fn main() -> std::process::ExitCode {
///     let run = async {
///         let config = ServiceConfig::load("notifier.toml")?;
///         let mut service = Service::start(config).await?;
///         let subscription = service.subscription("notifier", Noop)?.build()?;
///         service.add(subscription);
///         Ok::<_, Box<dyn std::error::Error>>(service.run().await)
///     };
///     match run.await {
///         Ok(exit) => exit.exit_code(),
///         Err(e) => {
///             eprintln!("{e}");
///             std::process::ExitCode::FAILURE
///         }
///     }
/// }
/// ```
pub struct Service {
    config: ServiceConfig,
    logging: LoggingGuard,
    metrics: PrometheusHandle,
    listener: TcpListener,
    local_addr: SocketAddr,
    added: Vec<Added>,
}

impl Service {
    /// Installs logging (as configured; an existing global subscriber is kept) and the
    /// Prometheus recorder, and binds the HTTP address. Nothing is consumed before
    /// [`Self::run`].
    pub async fn start(config: ServiceConfig) -> Result<Service, ServiceError> {
        let name = config
            .subscriptions
            .keys()
            .next()
            .cloned()
            .unwrap_or_else(|| "decaton-service".into());
        let logging =
            crate::logging::install(&config.service, &name).map_err(ServiceError::Start)?;
        for note in config.notes() {
            tracing::warn!("{note}");
        }
        let metrics = crate::metrics::install().map_err(ServiceError::Start)?;
        let listener = TcpListener::bind(config.service.http_addr)
            .await
            .map_err(|e| {
                ServiceError::Start(format!(
                    "cannot listen on {}: {e}",
                    config.service.http_addr
                ))
            })?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| ServiceError::Start(e.to_string()))?;
        tracing::info!(addr = %local_addr, "serving /metrics, /health/live and /health/ready");
        Ok(Service {
            config,
            logging,
            metrics,
            listener,
            local_addr,
            added: Vec::new(),
        })
    }

    /// The address the HTTP endpoint listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The configuration.
    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    /// A builder for subscription `id` running `processor`, set up from the
    /// `[subscriptions.<id>]` table (bootstrap servers, topic, properties, librdkafka
    /// settings, state store). Errors if the file has no such table.
    pub fn subscription<T, P>(
        &self,
        id: &str,
        processor: P,
    ) -> Result<SubscriptionBuilder<T, P>, ServiceError>
    where
        T: prost::Message + Default + Send + 'static,
        P: TaskProcessor<T>,
    {
        let config = self.subscription_config(id)?;
        Ok(config.apply(Subscription::builder(id, processor)))
    }

    fn subscription_config(&self, id: &str) -> Result<&SubscriptionConfig, ServiceError> {
        self.config.subscriptions.get(id).ok_or_else(|| {
            ServiceError::Start(format!(
                "the configuration has no [subscriptions.{id}] table"
            ))
        })
    }

    /// Hosts `subscription`; it starts with [`Self::run`].
    pub fn add<T, P>(&mut self, subscription: Subscription<T, P>)
    where
        T: prost::Message + Default + Send + 'static,
        P: TaskProcessor<T>,
    {
        let id = subscription.id().to_string();
        let hosted = Arc::new(Hosted::new(id, subscription.handle()));
        self.added.push(Added {
            hosted,
            run: Box::pin(subscription.run()),
        });
    }

    /// Runs every added subscription until SIGTERM or SIGINT, then shuts them down
    /// gracefully (each within its `shutdown_timeout`). A second signal exits the process
    /// at once. Returns how it ended; see [`ServiceExit`] for the exit codes.
    pub async fn run(self) -> ServiceExit {
        let Service {
            config,
            logging,
            metrics,
            listener,
            added,
            ..
        } = self;
        let exit = Self::serve(config, metrics, listener, added).await;
        #[cfg(feature = "otel")]
        if let Some(exporter) = logging.exporter {
            // Flushing waits for the collector: off the async workers.
            let _ = tokio::task::spawn_blocking(move || exporter.shutdown()).await;
        }
        #[cfg(not(feature = "otel"))]
        let LoggingGuard {} = logging;
        exit
    }

    async fn serve(
        config: ServiceConfig,
        metrics: PrometheusHandle,
        listener: TcpListener,
        added: Vec<Added>,
    ) -> ServiceExit {
        if added.is_empty() {
            return ServiceExit::Failed("no subscription to run".into());
        }
        let unused: Vec<&String> = config
            .subscriptions
            .keys()
            .filter(|id| !added.iter().any(|a| &a.hosted.id == *id))
            .collect();
        if !unused.is_empty() {
            return ServiceExit::Failed(format!(
                "the configuration lists subscriptions this program does not run: {unused:?}"
            ));
        }
        let hosted: Vec<Arc<Hosted>> = added.iter().map(|a| a.hosted.clone()).collect();
        let mut probes = Vec::new();
        for h in &hosted {
            if let Some(c) = config.subscriptions.get(&h.id) {
                match lag::start(&h.id, c.topics(), &c.kafka, config.service.lag_interval) {
                    Ok(p) => probes.push(p),
                    Err(e) => tracing::warn!("{e}; no lag metrics for {}", h.id),
                }
            }
        }
        let endpoint = Arc::new(Endpoint {
            metrics: metrics.clone(),
            hosted: hosted.clone(),
            settings: config.service.clone(),
        });
        let server = tokio::spawn(http::serve(listener, endpoint.clone()));
        let background = tokio::spawn(async move {
            let mut tick = tokio::time::interval(health::EVALUATE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                metrics.run_upkeep();
                health::readiness(&endpoint.hosted, &endpoint.settings);
            }
        });

        let mut running = JoinSet::new();
        for Added { hosted, run } in added {
            running.spawn(async move {
                let result = run.await;
                hosted.stopped.store(true, Ordering::Release);
                (hosted, result)
            });
        }
        tracing::info!(subscriptions = ?hosted.iter().map(|h| &h.id).collect::<Vec<_>>(),
            "running; SIGTERM or SIGINT drains and stops, a second one exits at once");

        let signals = crate::signals::Signals::listen();
        let mut signals = match signals {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!("cannot listen for signals: {e}; stopping");
                for h in &hosted {
                    h.handle.shutdown();
                }
                None
            }
        };
        let mut failure: Option<String> = None;
        let mut abandoned_before: Option<u64> = None;
        let abandoned_now = |hosted: &[Arc<Hosted>]| -> u64 {
            hosted.iter().map(|h| h.handle.stats().abandoned).sum()
        };
        loop {
            tokio::select! {
                signal = async {
                    match signals.as_mut() {
                        Some(s) => s.next().await,
                        None => std::future::pending().await,
                    }
                }, if abandoned_before.is_none() => {
                    tracing::info!(signal, "signal received; draining (a second signal exits at once)");
                    abandoned_before = Some(abandoned_now(&hosted));
                    for h in &hosted {
                        h.draining.store(true, Ordering::Release);
                        h.handle.shutdown();
                    }
                    if let Some(mut s) = signals.take() {
                        tokio::spawn(async move {
                            let second = s.next().await;
                            tracing::warn!(signal = second, "second signal; exiting without finishing the drain");
                            std::process::exit(128 + crate::signals::number(second));
                        });
                    }
                }
                done = running.join_next() => {
                    let Some(done) = done else { break };
                    let (h, result) = match done {
                        Ok(x) => x,
                        Err(e) => {
                            failure.get_or_insert(format!("a subscription task failed: {e}"));
                            continue;
                        }
                    };
                    match result {
                        Ok(stats) => tracing::info!(subscription = %h.id, processed = stats.processed,
                            failed = stats.failed, "subscription stopped"),
                        Err(e) => {
                            tracing::error!(subscription = %h.id, "subscription failed: {e}");
                            failure.get_or_insert(format!("subscription {}: {e}", h.id));
                        }
                    }
                    if abandoned_before.is_none() {
                        // Stopped without being asked: the others are shut down too.
                        failure.get_or_insert(format!("subscription {} stopped", h.id));
                        abandoned_before = Some(abandoned_now(&hosted));
                        for other in &hosted {
                            other.draining.store(true, Ordering::Release);
                            other.handle.shutdown();
                        }
                    }
                }
            }
        }
        server.abort();
        background.abort();
        drop(probes);
        if let Some(f) = failure {
            return ServiceExit::Failed(f);
        }
        let abandoned = abandoned_now(&hosted) - abandoned_before.unwrap_or(0);
        if abandoned > 0 {
            tracing::warn!(
                abandoned,
                "tasks still running at the shutdown timeout were abandoned"
            );
            ServiceExit::Incomplete { abandoned }
        } else {
            tracing::info!("drained; every subscription committed and left its group");
            ServiceExit::Drained
        }
    }
}
