//! A raw HTTP/1.1 server on `127.0.0.1:0` for tests. It answers each
//! request with whatever the handler returns, including garbage, silence and
//! endless bodies, which no well-behaved framework would produce.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// What to do with one request.
#[derive(Debug, Clone)]
pub(crate) enum Reply {
    /// A status line and a `Content-Length` body.
    Status(u16, Vec<u8>),
    /// Read the request and never answer (the socket stays open).
    Hang,
    /// Write these bytes and close.
    Raw(Vec<u8>),
    /// `200` without `Content-Length`, then body bytes until the peer leaves.
    Endless,
    /// `200` declaring 1 KiB, then one byte per interval.
    Drip(Duration),
}

type Handler = dyn Fn(&str) -> Reply + Send + Sync;

/// A running server; dropping it (or [`stop`](Self::stop)) closes the port.
pub(crate) struct TestServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
    hits: Arc<AtomicUsize>,
}

impl TestServer {
    /// Binds a fresh port and serves `handler(path)` for every request.
    pub(crate) async fn start(handler: impl Fn(&str) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let handler: Arc<Handler> = Arc::new(handler);
        let counter = hits.clone();
        let task = tokio::spawn(async move {
            // Connection tasks die with this one: the set aborts them on drop.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        counter.fetch_add(1, Ordering::SeqCst);
                        conns.spawn(serve(stream, handler.clone()));
                    }
                    Some(_) = conns.join_next() => {}
                }
            }
        });
        Self { addr, task, hits }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Connections accepted so far.
    pub(crate) fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Closes the port and every open connection.
    pub(crate) async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, handler: Arc<Handler>) {
    let Some(path) = read_head(&mut stream).await else {
        return;
    };
    match handler(&path) {
        Reply::Status(code, body) => {
            let head = format!(
                "HTTP/1.1 {code} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&body).await;
            let _ = stream.shutdown().await;
        }
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Reply::Raw(bytes) => {
            let _ = stream.write_all(&bytes).await;
            let _ = stream.shutdown().await;
        }
        Reply::Endless => {
            if stream
                .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            let chunk = vec![b'x'; 64 * 1024];
            while stream.write_all(&chunk).await.is_ok() {}
        }
        Reply::Drip(every) => {
            if stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            for _ in 0..1024 {
                tokio::time::sleep(every).await;
                if stream.write_all(b"x").await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Reads up to the end of the request head; returns the request path.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > 64 * 1024 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let line = head.lines().next()?;
    line.split(' ').nth(1).map(str::to_string)
}
