//! Running an example processor as a service in a child process, and talking to it over
//! HTTP the way Prometheus and an orchestrator do.

#![allow(dead_code)]

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;

/// A service running in a child process; killed when dropped.
pub struct ServiceProcess {
    pub name: String,
    child: Child,
    pub addr: SocketAddr,
    /// Every stderr line so far (bounded: the newest `MAX_LINES`).
    pub log: Arc<Mutex<Vec<String>>>,
    stdout: Option<std::thread::JoinHandle<String>>,
}

const MAX_LINES: usize = 20_000;

/// The examples' configuration file of `name`.
pub fn config_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(format!("{name}.toml"))
}

impl ServiceProcess {
    /// Starts `binary` with `args` and `env` (its HTTP endpoint on a free port, JSON
    /// logs) and waits for the line that gives the endpoint's address.
    pub fn start(
        name: &str,
        binary: &str,
        args: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<ServiceProcess> {
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .env_remove("RUST_LOG")
            .env("DECATON_SERVICE__HTTP_ADDR", "127.0.0.1:0")
            .env("DECATON_SERVICE__LOG_FORMAT", "json")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().with_context(|| format!("starting {binary}"))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let mut stdout = child.stdout.take().context("no stdout")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut addr_tx = Some(addr_tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if addr_tx.is_some() && line.contains("serving /metrics") {
                        let addr = serde_json::from_str::<serde_json::Value>(&line)
                            .ok()
                            .and_then(|v| v["fields"]["addr"].as_str().map(String::from));
                        if let Some(tx) = addr_tx.take() {
                            let _ = tx.send(addr);
                        }
                    }
                    let mut log = log.lock();
                    if log.len() >= MAX_LINES {
                        log.remove(0);
                    }
                    log.push(line);
                }
            });
        }
        let stdout = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
            s
        });
        let addr = match addr_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Some(addr)) => addr.parse()?,
            other => {
                let _ = child.kill();
                bail!(
                    "{name} did not report its address ({other:?}); stderr:\n{}",
                    log.lock().join("\n")
                );
            }
        };
        Ok(ServiceProcess {
            name: name.to_string(),
            child,
            addr,
            log,
            stdout: Some(stdout),
        })
    }

    /// `GET path`: status and body.
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        get(self.addr, path).await
    }

    /// Sends `signal` (`TERM`, `INT`, `KILL`) to the process.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} failed");
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit; returns its status and stdout.
    pub fn wait(mut self, timeout: Duration) -> anyhow::Result<(ExitStatus, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                let out = self
                    .stdout
                    .take()
                    .map(|h| h.join().unwrap_or_default())
                    .unwrap_or_default();
                return Ok((status, out));
            }
            if Instant::now() >= deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            // Polling the child's state; its exit is what we wait for.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Log lines so far, one string.
    pub fn log_text(&self) -> String {
        self.log.lock().join("\n")
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A plain HTTP/1.1 `GET` with hyper's client.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    driver.abort();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The sum of every sample of `metric` whose labels contain `label` (e.g.
/// `subscription="x"`), in Prometheus text.
pub fn metric_sum(text: &str, metric: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `check` every 100 ms until it returns `Some`, or fails after `timeout` with
/// `what` and the last value seen.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            bail!("{what}: not within {timeout:?} (last error: {last_err:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs an example binary to its end and returns the numbers of its summary line (the
/// line of its standard output that starts with `summary_prefix`), in order; fails with
/// its output when it exits unsuccessfully or prints no such line.
pub fn example_summary(
    binary: &str,
    args: &[&str],
    summary_prefix: &str,
) -> anyhow::Result<(String, Vec<u64>)> {
    let out = Command::new(binary).args(args).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "exit {:?}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let summary = stdout
        .lines()
        .find(|l| l.starts_with(summary_prefix))
        .ok_or_else(|| anyhow::anyhow!("no summary in {stdout}"))?
        .to_string();
    let numbers = summary
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    Ok((summary, numbers))
}
