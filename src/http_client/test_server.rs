//! A raw HTTP/1.1 server on `127.0.0.1:0` for tests. It answers each
//! request with whatever the handler returns, including garbage, silence and
//! endless bodies, which no well-behaved framework would produce. Every
//! request read (method, path, headers, `Content-Length` body) is kept for
//! the test to inspect.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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

/// One request as the server read it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Recorded {
    /// Request method (`GET`, `POST`).
    pub(crate) method: String,
    /// Request target, e.g. `/hook?x=1`.
    pub(crate) path: String,
    /// Header names lower-cased, values as sent, in order.
    pub(crate) headers: Vec<(String, String)>,
    /// The `Content-Length` body (empty without one).
    pub(crate) body: Vec<u8>,
    /// The raw bytes read: head and body.
    pub(crate) raw: Vec<u8>,
}

impl Recorded {
    /// The first value of header `name` (lower case).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

type Handler = dyn Fn(&Recorded) -> Reply + Send + Sync;

/// A running server; dropping it (or [`stop`](Self::stop)) closes the port.
pub(crate) struct TestServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
    hits: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

impl TestServer {
    /// Binds a fresh port and serves `handler(path)` for every request.
    pub(crate) async fn start(handler: impl Fn(&str) -> Reply + Send + Sync + 'static) -> Self {
        Self::start_with(move |req: &Recorded| handler(&req.path)).await
    }

    /// Binds a fresh port and serves `handler(request)` for every request.
    pub(crate) async fn start_with(
        handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let counter = hits.clone();
        let log = requests.clone();
        let task = tokio::spawn(async move {
            // Connection tasks die with this one: the set aborts them on drop.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        counter.fetch_add(1, Ordering::SeqCst);
                        conns.spawn(serve(stream, handler.clone(), log.clone()));
                    }
                    Some(_) = conns.join_next() => {}
                }
            }
        });
        Self {
            addr,
            task,
            hits,
            requests,
        }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Connections accepted so far.
    pub(crate) fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Requests read so far, in arrival order.
    pub(crate) fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().expect("request log").clone()
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

async fn serve(mut stream: TcpStream, handler: Arc<Handler>, log: Arc<Mutex<Vec<Recorded>>>) {
    let Some(request) = read_request(&mut stream).await else {
        return;
    };
    log.lock().expect("request log").push(request.clone());
    match handler(&request) {
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

/// Reads the request head and its `Content-Length` body.
async fn read_request(stream: &mut TcpStream) -> Option<Recorded> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let head_len = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > 64 * 1024 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let mut lines = head.lines();
    let mut start = lines.next()?.split(' ');
    let method = start.next()?.to_string();
    let path = start.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0)
        .min(1024 * 1024);
    while buf.len() < head_len + len {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(Recorded {
        method,
        path,
        headers,
        body: buf[head_len..head_len + len].to_vec(),
        raw: buf,
    })
}
