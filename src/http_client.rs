//! A small HTTP/1.1 client for SPIRE's plain-HTTP endpoints: GET for the
//! `health_checks` listener (`/live`, `/ready`) and the Prometheus exporter,
//! both served without TLS on loopback or pod IPs; POST for webhooks.
//!
//! One connection per request and no pooling (polls are seconds apart), no
//! redirects and no TLS: `https://` URLs are rejected. Guarantees:
//!
//! - the whole request (connect, send, headers, body) runs under one total
//!   deadline, and the connect step under its own, shorter one;
//! - the body is read frame by frame against a size cap, so a misbehaving
//!   peer costs at most `max_body` bytes (plus one read buffer) and `timeout`
//!   of time;
//! - the connection is driven inside the returned future, never on a
//!   spawned task: dropping the future closes the socket (cancel-safe);
//! - extra request headers are marked sensitive and never appear in errors
//!   or logs: they may carry credentials.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request, Uri, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

/// Default body cap: large enough for a busy SPIRE server's exposition.
pub const DEFAULT_MAX_BODY: usize = 16 * 1024 * 1024;

/// Default connect deadline.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// `User-Agent` sent with every request.
const USER_AGENT: &str = concat!("spire-healer/", env!("CARGO_PKG_VERSION"));

/// Headers the client sets itself (or that would break its framing): not
/// accepted as extra headers.
const RESERVED_HEADERS: [&str; 6] = [
    "host",
    "user-agent",
    "connection",
    "content-length",
    "transfer-encoding",
    "upgrade",
];

/// Limits and headers for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Deadline for the TCP connect, capped by `timeout`.
    pub connect_timeout: Duration,
    /// Deadline for the whole exchange, connect included.
    pub timeout: Duration,
    /// Largest body accepted, in bytes.
    pub max_body: usize,
    /// `Accept` header value, if any.
    pub accept: Option<&'static str>,
}

impl Options {
    /// Total deadline `timeout`, [`DEFAULT_CONNECT_TIMEOUT`],
    /// [`DEFAULT_MAX_BODY`] and no `Accept` header.
    pub fn new(timeout: Duration) -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            timeout,
            max_body: DEFAULT_MAX_BODY,
            accept: None,
        }
    }

    /// Sets the body cap.
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// Sets the connect deadline.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the `Accept` header.
    pub fn accept(mut self, value: &'static str) -> Self {
        self.accept = Some(value);
        self
    }
}

/// A complete response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// The whole body, at most `max_body` bytes.
    pub body: Vec<u8>,
}

/// Why a GET failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Not an `http://host[:port][/path]` URL (this includes `https://`).
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The TCP connection could not be opened within the connect deadline
    /// (refused, unroutable, unresolvable, or no answer to the SYN).
    #[error("cannot connect to {addr}")]
    Connect {
        /// `host:port` dialled.
        addr: String,
        /// The I/O error (`TimedOut` when the connect deadline passed).
        #[source]
        source: std::io::Error,
    },
    /// Connected, but no complete response within the total deadline: the
    /// peer accepts connections and does not answer (a frozen process).
    #[error("no complete response within {after:?}")]
    Timeout {
        /// The total deadline.
        after: Duration,
    },
    /// The body (declared or received) exceeds the cap.
    #[error("response body exceeds {limit} bytes")]
    TooLarge {
        /// The cap in bytes.
        limit: usize,
    },
    /// The peer did not speak HTTP/1.x correctly, or closed the connection
    /// mid-response.
    #[error("HTTP protocol error")]
    Protocol(#[source] hyper::Error),
    /// An extra request header is malformed or one the client sets itself.
    /// Only the name is kept: the value may be a secret.
    #[error("invalid header {name:?}: {reason}")]
    InvalidHeader {
        /// Header name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl HttpError {
    /// Closed-set label: `invalid_url`, `connect`, `timeout`, `too_large`,
    /// `protocol` or `invalid_header`.
    pub fn kind(&self) -> &'static str {
        match self {
            HttpError::InvalidUrl { .. } => "invalid_url",
            HttpError::Connect { .. } => "connect",
            HttpError::Timeout { .. } => "timeout",
            HttpError::TooLarge { .. } => "too_large",
            HttpError::Protocol(_) => "protocol",
            HttpError::InvalidHeader { .. } => "invalid_header",
        }
    }
}

/// Where to connect and what to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// Host for the socket address (IPv6 without brackets).
    host: String,
    port: u16,
    /// `Host` header value.
    authority: String,
    /// Origin-form request target.
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self, HttpError> {
        let bad = |reason| HttpError::InvalidUrl {
            url: url.to_string(),
            reason,
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(bad(
                    "https is not supported: SPIRE health and metrics listeners are plain HTTP",
                ));
            }
            _ => return Err(bad("only http:// URLs are supported")),
        }
        let authority = uri.authority().ok_or_else(|| bad("missing host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user information is not supported"));
        }
        let host = authority.host();
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        // `Uri` drops a port that does not fit in u16, so check the text.
        let port = match authority.as_str().get(host.len()..) {
            None | Some("") => 80,
            Some(rest) => match rest.strip_prefix(':').map(str::parse::<u16>) {
                Some(Ok(p)) if p != 0 => p,
                _ => return Err(bad("port must be between 1 and 65535")),
            },
        };
        let socket_host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Ok(Self {
            host: socket_host.to_string(),
            port,
            authority: authority.as_str().to_string(),
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
        })
    }

    /// The host as written in the URL (IPv6 in brackets), for messages.
    fn authority_host(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }
}

/// Checks that `url` is one [`get`] and [`post`] accept
/// (`http://host[:port][/path]`), without dialling.
///
/// # Errors
/// What is wrong with it; the reason never quotes the URL.
pub fn check_url(url: &str) -> Result<(), &'static str> {
    match Target::parse(url) {
        Ok(_) => Ok(()),
        Err(HttpError::InvalidUrl { reason, .. }) => Err(reason),
        Err(_) => Err("not a URL"),
    }
}

/// Checks one extra header for [`post`]: a valid name that the client does
/// not set itself, and a valid value.
///
/// # Errors
/// What is wrong with it; the reason never quotes the value.
pub fn check_header(name: &str, value: &str) -> Result<(), &'static str> {
    parse_header(name, value).map(drop)
}

fn parse_header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), &'static str> {
    let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| "not a valid header name")?;
    if RESERVED_HEADERS.contains(&name.as_str()) {
        return Err("set by the client itself");
    }
    let mut value = HeaderValue::from_str(value)
        .map_err(|_| "value must be visible ASCII, spaces or tabs, without line breaks")?;
    value.set_sensitive(true);
    Ok((name, value))
}

/// GETs `url` (`http://host[:port][/path]`) and returns the status and the
/// whole body. Any status is a success here; callers judge it.
///
/// # Errors
/// See [`HttpError`]; [`HttpError::kind`] gives the metric label.
///
/// # Cancel safety
/// Cancel-safe: the connection lives inside the future, so dropping it
/// closes the socket and nothing keeps running.
pub async fn get(url: &str, opts: &Options) -> Result<Response, HttpError> {
    let target = Target::parse(url)?;
    let call = exchange(
        &target,
        Method::GET,
        Vec::new(),
        Empty::<Bytes>::new(),
        opts,
    );
    deadline(call, opts).await
}

/// POSTs `body` to `url` (`http://host[:port][/path]`) with `headers`
/// (e.g. `content-type`, an authorization token) and returns the status and
/// the whole body. Any status is a success here; callers judge it.
///
/// `Content-Length` is set from the body. Extra headers are checked with
/// [`check_header`] before dialling, marked sensitive, and never quoted in
/// errors. The same limits as [`get`] apply.
///
/// # Errors
/// See [`HttpError`]; [`HttpError::kind`] gives the metric label. A bad
/// header is [`HttpError::InvalidHeader`].
///
/// # Cancel safety
/// Cancel-safe, as [`get`]. The peer may or may not have received the body.
pub async fn post(
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
    opts: &Options,
) -> Result<Response, HttpError> {
    let target = Target::parse(url)?;
    let extra = headers
        .iter()
        .map(|(name, value)| {
            parse_header(name, value).map_err(|reason| HttpError::InvalidHeader {
                name: (*name).to_string(),
                reason,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let call = exchange(&target, Method::POST, extra, Full::new(body.into()), opts);
    deadline(call, opts).await
}

/// Runs one exchange under the total deadline.
async fn deadline(
    call: impl Future<Output = Result<Response, HttpError>>,
    opts: &Options,
) -> Result<Response, HttpError> {
    match tokio::time::timeout(opts.timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(HttpError::Timeout {
            after: opts.timeout,
        }),
    }
}

/// Connect, send one request, read the response; no deadline of its own
/// except for the connect.
async fn exchange<B>(
    target: &Target,
    method: Method,
    extra: Vec<(HeaderName, HeaderValue)>,
    body: B,
    opts: &Options,
) -> Result<Response, HttpError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let addr = format!("{}:{}", target.authority_host(), target.port);
    let connect = TcpStream::connect((target.host.as_str(), target.port));
    let stream = match tokio::time::timeout(opts.connect_timeout.min(opts.timeout), connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(HttpError::Connect { addr, source }),
        Err(_) => {
            return Err(HttpError::Connect {
                addr,
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect deadline passed",
                ),
            });
        }
    };
    // Latency over throughput: one small request per connection.
    let _ = stream.set_nodelay(true);

    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(HttpError::Protocol)?;

    let mut request = Request::builder()
        .method(method)
        .uri(target.path.as_str())
        .header(header::HOST, target.authority.as_str())
        .header(header::USER_AGENT, USER_AGENT)
        .header(header::CONNECTION, "close");
    if let Some(accept) = opts.accept {
        request = request.header(header::ACCEPT, accept);
    }
    let mut request = request.body(body).map_err(|_| HttpError::InvalidUrl {
        url: target.path.clone(),
        reason: "not a valid request target",
    })?;
    for (name, value) in extra {
        request.headers_mut().append(name, value);
    }

    let max_body = opts.max_body;
    let fetch = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(HttpError::Protocol)?;
        let status = response.status().as_u16();
        let declared = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|len| len > max_body as u64) {
            return Err(HttpError::TooLarge { limit: max_body });
        }
        // A declared length is only a first check: it may be a lie.
        let body = Limited::new(response.into_body(), max_body)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => HttpError::Protocol(*e),
                // The one error `Limited` adds: `LengthLimitError`.
                Err(_) => HttpError::TooLarge { limit: max_body },
            })?
            .to_bytes();
        Ok(Response {
            status,
            body: Vec::from(body),
        })
    };

    // Drive the connection and the exchange together. If the connection
    // ends first (peer closed, parse error), the exchange sees the error on
    // its own, so keep polling it alone.
    let mut conn = std::pin::pin!(conn);
    let mut fetch = std::pin::pin!(fetch);
    let mut conn_open = true;
    loop {
        tokio::select! {
            result = &mut fetch => return result,
            ended = &mut conn, if conn_open => {
                conn_open = false;
                if let Err(error) = ended {
                    debug!(%error, addr = %addr, "HTTP connection failed.");
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod test_server;

#[cfg(test)]
mod tests;
