//! Metrics, logs, traces and the HTTP endpoints `/metrics`, `/healthz`,
//! `/readyz`.

pub mod metrics;
pub mod tracing;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

pub use metrics::Metrics;

use crate::clock::{Clock, from_unix_millis, saturating_since, unix_millis};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Installs the global `tracing` subscriber for logs only (no trace
/// export). `RUST_LOG` overrides `default_level`.
pub fn init_logging(format: LogFormat, default_level: &str) {
    // Without an exporter nothing can fail.
    let _ = self::tracing::init(format, default_level, None, &Metrics::new());
}

/// Liveness and readiness shared between the loop and the HTTP server.
#[derive(Debug)]
pub struct Health {
    last_tick_ms: AtomicI64,
    ready: AtomicBool,
    /// A cluster instance standing by: live and ready without ticking.
    standby: AtomicBool,
    /// A tick older than this means the loop is stuck.
    stale_after: Duration,
}

impl Health {
    /// `stale_after`: how old the last tick may be for `/healthz` to pass.
    pub fn new(stale_after: Duration) -> Self {
        Self {
            last_tick_ms: AtomicI64::new(0),
            ready: AtomicBool::new(false),
            standby: AtomicBool::new(false),
            stale_after,
        }
    }

    /// Records a completed tick.
    pub fn ticked(&self, at: SystemTime) {
        self.last_tick_ms.store(unix_millis(at), Ordering::Relaxed);
    }

    /// Marks the process ready (store open, first tick done).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Standing by (campaigning for leadership): live and ready, no loop.
    pub fn set_standby(&self, standby: bool) {
        self.standby.store(standby, Ordering::Relaxed);
    }

    /// Whether it stands by.
    pub fn is_standby(&self) -> bool {
        self.standby.load(Ordering::Relaxed)
    }

    /// The loop has ticked within `stale_after` of `now` (or it stands by).
    pub fn is_live(&self, now: SystemTime) -> bool {
        if self.is_standby() {
            return true;
        }
        let ms = self.last_tick_ms.load(Ordering::Relaxed);
        ms > 0 && saturating_since(now, from_unix_millis(ms)) <= self.stale_after
    }

    /// Live and marked ready.
    pub fn is_ready(&self, now: SystemTime) -> bool {
        self.ready.load(Ordering::Relaxed) && self.is_live(now)
    }
}

#[derive(Clone)]
struct HttpState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    clock: Arc<dyn Clock>,
}

/// The HTTP router (exposed for tests).
pub fn router(metrics: Arc<Metrics>, health: Arc<Health>, clock: Arc<dyn Clock>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(HttpState {
            metrics,
            health,
            clock,
        })
}

async fn metrics_handler(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn healthz(State(s): State<HttpState>) -> impl IntoResponse {
    if s.health.is_live(s.clock.now()) {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "loop has not ticked recently\n",
        )
    }
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    if s.health.is_standby() {
        (StatusCode::OK, "standby\n")
    } else if s.health.is_ready(s.clock.now()) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Binds `addr` and returns the bound address and the serving future, which
/// ends when `shutdown` is cancelled.
///
/// # Errors
/// The address cannot be bound.
pub async fn serve_http(
    addr: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, impl Future<Output = std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let fut = async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    };
    Ok((local, fut))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn health_goes_stale() {
        let clock = ManualClock::at_unix(10_000);
        let h = Health::new(Duration::from_secs(5));
        assert!(!h.is_live(clock.now()));
        h.ticked(clock.now());
        assert!(h.is_live(clock.now()));
        assert!(!h.is_ready(clock.now()));
        h.set_ready(true);
        assert!(h.is_ready(clock.now()));
        clock.advance(Duration::from_secs(6));
        assert!(!h.is_live(clock.now()));
    }

    #[tokio::test]
    async fn serves_metrics_and_health() {
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::at_unix(10_000));
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::new(Duration::from_secs(5)));
        health.ticked(clock.now());
        let shutdown = CancellationToken::new();
        let (addr, fut) = serve_http(
            "127.0.0.1:0".parse().unwrap(),
            router(metrics, health.clone(), clock),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let server = tokio::spawn(fut);
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        let m = get("/metrics").await;
        assert!(m.contains("spire_healer_tick_duration_seconds"));
        shutdown.cancel();
        server.await.unwrap().unwrap();
    }
}
