//! SPIFFE endpoint addresses (`SPIFFE_Workload_Endpoint.md` §4) and gRPC
//! channels to them.
//!
//! Accepted forms:
//!
//! - `unix:///absolute/path`: no authority, an absolute path, nothing else.
//!   `unix:/absolute/path` is the same URI without the empty authority; the
//!   standard's rule ("authority MUST NOT be set, path MUST be absolute")
//!   admits it and go-spiffe accepts it, so we do too. The path is
//!   percent-decoded and kept verbatim otherwise (`..` is left to the OS).
//! - `tcp://IP:port`: an IPv4 literal or a bracketed IPv6 literal, a decimal
//!   port, nothing else.
//!
//! The scheme is case-insensitive (RFC 3986 §3.1). Everything else, including
//! an empty query (`?`) or fragment (`#`), is refused with an error naming
//! what is wrong.

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, percent_encode};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Uri};

/// The environment variable clients fall back to when no endpoint is
/// configured.
pub const SOCKET_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";

/// Longest Unix socket path: `sun_path` is 108 bytes including the NUL.
const MAX_UNIX_PATH: usize = 107;

/// Why an endpoint address is unusable.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The address is empty.
    #[error("the endpoint address is empty")]
    Empty,
    /// The address has no `scheme:`.
    #[error("endpoint {uri:?} has no scheme: write unix:///absolute/path or tcp://IP:port")]
    NoScheme {
        /// The address as given.
        uri: String,
    },
    /// A scheme other than `unix` or `tcp`.
    #[error("endpoint {uri:?} has scheme {scheme:?}; only \"unix\" and \"tcp\" are supported")]
    UnsupportedScheme {
        /// The address as given.
        uri: String,
        /// The scheme found.
        scheme: String,
    },
    /// A `?query` or `#fragment`, which endpoint URIs must not have.
    #[error("endpoint {uri:?} must not have a query ('?') or fragment ('#')")]
    HasQueryOrFragment {
        /// The address as given.
        uri: String,
    },
    /// A Unix endpoint with an authority, e.g. `unix://host/path` or
    /// `unix://tmp/a.sock`.
    #[error(
        "unix endpoint {uri:?} has authority {authority:?}; write unix:///absolute/path (three slashes)"
    )]
    HasAuthority {
        /// The address as given.
        uri: String,
        /// The authority found.
        authority: String,
    },
    /// A Unix endpoint with no path.
    #[error("unix endpoint {uri:?} has no socket path")]
    MissingPath {
        /// The address as given.
        uri: String,
    },
    /// A Unix endpoint whose path is not absolute.
    #[error("unix endpoint {uri:?} has a relative socket path; it must be absolute")]
    RelativePath {
        /// The address as given.
        uri: String,
    },
    /// A Unix endpoint whose path cannot be decoded to a file name.
    #[error("unix endpoint {uri:?} has an invalid socket path: {reason}")]
    InvalidPath {
        /// The address as given.
        uri: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A Unix socket path longer than the kernel accepts.
    #[error("unix endpoint {uri:?} has a socket path of {len} bytes; the limit is 107")]
    PathTooLong {
        /// The address as given.
        uri: String,
        /// Length of the decoded path in bytes.
        len: usize,
    },
    /// `tcp:` without `//`, e.g. `tcp:127.0.0.1:8000`.
    #[error("tcp endpoint {uri:?} must be written tcp://IP:port")]
    TcpMissingAuthority {
        /// The address as given.
        uri: String,
    },
    /// A `user@` part in the authority.
    #[error("endpoint {uri:?} must not contain user information ('@')")]
    HasUserinfo {
        /// The address as given.
        uri: String,
    },
    /// A TCP host that is not an IP literal (e.g. a DNS name).
    #[error(
        "tcp endpoint {uri:?} has host {host:?}; the host must be an IP address (IPv6 in brackets)"
    )]
    TcpHostNotIp {
        /// The address as given.
        uri: String,
        /// The host found.
        host: String,
    },
    /// A TCP endpoint without a port.
    #[error("tcp endpoint {uri:?} has no port")]
    TcpMissingPort {
        /// The address as given.
        uri: String,
    },
    /// A TCP port that is not a decimal number from 0 to 65535.
    #[error("tcp endpoint {uri:?} has port {port:?}; it must be a number from 0 to 65535")]
    TcpBadPort {
        /// The address as given.
        uri: String,
        /// The port found.
        port: String,
    },
    /// A TCP endpoint with a path (even `/`).
    #[error("tcp endpoint {uri:?} must not have a path")]
    TcpHasPath {
        /// The address as given.
        uri: String,
    },
    /// Neither a configured endpoint nor `SPIFFE_ENDPOINT_SOCKET`.
    #[error("no SPIFFE endpoint is configured and SPIFFE_ENDPOINT_SOCKET is not set")]
    NotConfigured,
    /// Something other than a socket sits at the Unix endpoint's path.
    #[error("{} is a {found}, not a Unix socket", path.display())]
    NotASocket {
        /// The endpoint's path.
        path: PathBuf,
        /// What is there: `regular file`, `directory`, `FIFO`, …
        found: &'static str,
    },
    /// The Unix endpoint's path cannot be inspected (e.g. permission denied).
    #[error("cannot inspect {}", path.display())]
    Inspect {
        /// The endpoint's path.
        path: PathBuf,
        /// The error from `stat`.
        #[source]
        source: io::Error,
    },
    /// tonic refused to build a channel.
    #[error("cannot build a gRPC channel to the endpoint")]
    Channel {
        /// tonic's error.
        #[source]
        source: tonic::transport::Error,
    },
}

impl EndpointError {
    /// Stable snake_case label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::NoScheme { .. } => "no_scheme",
            Self::UnsupportedScheme { .. } => "unsupported_scheme",
            Self::HasQueryOrFragment { .. } => "query_or_fragment",
            Self::HasAuthority { .. } => "authority",
            Self::MissingPath { .. } => "missing_path",
            Self::RelativePath { .. } => "relative_path",
            Self::InvalidPath { .. } => "invalid_path",
            Self::PathTooLong { .. } => "path_too_long",
            Self::TcpMissingAuthority { .. } => "tcp_missing_authority",
            Self::HasUserinfo { .. } => "userinfo",
            Self::TcpHostNotIp { .. } => "tcp_host_not_ip",
            Self::TcpMissingPort { .. } => "tcp_missing_port",
            Self::TcpBadPort { .. } => "tcp_bad_port",
            Self::TcpHasPath { .. } => "tcp_has_path",
            Self::NotConfigured => "not_configured",
            Self::NotASocket { .. } => "not_a_socket",
            Self::Inspect { .. } => "inspect",
            Self::Channel { .. } => "channel",
        }
    }
}

/// Where a SPIFFE endpoint (Workload API, SPIRE admin API) listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A Unix domain socket at an absolute path.
    Unix(PathBuf),
    /// A TCP listener at an IP address and port.
    Tcp(SocketAddr),
}

impl Endpoint {
    /// Parses `unix:///abs/path` or `tcp://IP:port` per
    /// `SPIFFE_Workload_Endpoint.md` §4 (see the module docs for the exact
    /// rules).
    ///
    /// # Errors
    ///
    /// An [`EndpointError`] naming the first thing that is wrong.
    pub fn parse(s: &str) -> Result<Self, EndpointError> {
        if s.trim().is_empty() {
            return Err(EndpointError::Empty);
        }
        let uri = || s.to_owned();
        let Some((scheme, rest)) = s.split_once(':').filter(|(scheme, _)| is_scheme(scheme)) else {
            return Err(EndpointError::NoScheme { uri: uri() });
        };
        if rest.contains(['?', '#']) {
            return Err(EndpointError::HasQueryOrFragment { uri: uri() });
        }
        if scheme.eq_ignore_ascii_case("unix") {
            parse_unix(s, rest)
        } else if scheme.eq_ignore_ascii_case("tcp") {
            parse_tcp(s, rest)
        } else {
            Err(EndpointError::UnsupportedScheme {
                uri: uri(),
                scheme: scheme.to_owned(),
            })
        }
    }

    /// The configured value if there is one, else the `SPIFFE_ENDPOINT_SOCKET`
    /// variable read through `env`. A configured value is used even when it is
    /// invalid; an empty variable counts as unset.
    ///
    /// # Errors
    ///
    /// [`EndpointError::NotConfigured`] when neither is set, otherwise the
    /// errors of [`Endpoint::parse`].
    pub fn resolve(
        configured: Option<&str>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, EndpointError> {
        match configured {
            Some(value) => Self::parse(value),
            None => match env(SOCKET_ENV) {
                Some(value) if !value.is_empty() => Self::parse(&value),
                _ => Err(EndpointError::NotConfigured),
            },
        }
    }

    /// For a Unix endpoint, checks that whatever exists at the path is a
    /// socket. A missing path is fine: the agent may not have started yet.
    /// TCP endpoints always pass.
    ///
    /// # Errors
    ///
    /// [`EndpointError::NotASocket`] naming the path and what is there, or
    /// [`EndpointError::Inspect`] if the path cannot be inspected.
    pub fn check(&self) -> Result<(), EndpointError> {
        let Self::Unix(path) = self else {
            return Ok(());
        };
        let file_type = match std::fs::metadata(path) {
            Ok(meta) => meta.file_type(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(EndpointError::Inspect {
                    path: path.clone(),
                    source,
                });
            }
        };
        let found = if file_type.is_socket() {
            return Ok(());
        } else if file_type.is_file() {
            "regular file"
        } else if file_type.is_dir() {
            "directory"
        } else if file_type.is_fifo() {
            "FIFO"
        } else if file_type.is_char_device() {
            "character device"
        } else if file_type.is_block_device() {
            "block device"
        } else {
            "file of unknown type"
        };
        Err(EndpointError::NotASocket {
            path: path.clone(),
            found,
        })
    }

    /// A lazily connecting gRPC channel to this endpoint. Nothing is dialled
    /// until the first request; reconnects are tonic's, and callers handle
    /// request errors. `connect_timeout` bounds each dial.
    ///
    /// Unix endpoints send `:authority` `localhost`, as go-spiffe does.
    ///
    /// # Errors
    ///
    /// [`EndpointError::Channel`] if tonic rejects the address.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (tonic spawns the channel's worker task).
    pub fn channel(&self, connect_timeout: Duration) -> Result<Channel, EndpointError> {
        match self {
            Self::Tcp(addr) => {
                let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|source| EndpointError::Channel { source })?;
                Ok(endpoint.connect_timeout(connect_timeout).connect_lazy())
            }
            Self::Unix(path) => {
                let path = path.clone();
                let connector = tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move { UnixStream::connect(path).await.map(TokioIo::new) }
                });
                let endpoint = tonic::transport::Endpoint::from_static("http://localhost")
                    .connect_timeout(connect_timeout);
                Ok(endpoint.connect_with_connector_lazy(connector))
            }
        }
    }
}

/// RFC 3986: `ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )`.
fn is_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

fn parse_unix(uri: &str, rest: &str) -> Result<Endpoint, EndpointError> {
    let path = match rest.strip_prefix("//") {
        Some(after) => {
            let (authority, path) = after.split_at(after.find('/').unwrap_or(after.len()));
            if !authority.is_empty() {
                return Err(EndpointError::HasAuthority {
                    uri: uri.to_owned(),
                    authority: authority.to_owned(),
                });
            }
            path
        }
        None => rest,
    };
    if path.is_empty() {
        return Err(EndpointError::MissingPath {
            uri: uri.to_owned(),
        });
    }
    if !path.starts_with('/') {
        return Err(EndpointError::RelativePath {
            uri: uri.to_owned(),
        });
    }
    let invalid = |reason| EndpointError::InvalidPath {
        uri: uri.to_owned(),
        reason,
    };
    let bytes =
        percent_decode(path).ok_or_else(|| invalid("a '%' is not followed by two hex digits"))?;
    if bytes.contains(&0) {
        return Err(invalid("it contains a NUL byte"));
    }
    if bytes.len() > MAX_UNIX_PATH {
        return Err(EndpointError::PathTooLong {
            uri: uri.to_owned(),
            len: bytes.len(),
        });
    }
    Ok(Endpoint::Unix(
        Path::new(OsStr::from_bytes(&bytes)).to_path_buf(),
    ))
}

fn parse_tcp(uri: &str, rest: &str) -> Result<Endpoint, EndpointError> {
    let Some(after) = rest.strip_prefix("//") else {
        return Err(EndpointError::TcpMissingAuthority {
            uri: uri.to_owned(),
        });
    };
    let (authority, path) = after.split_at(after.find('/').unwrap_or(after.len()));
    if !path.is_empty() {
        return Err(EndpointError::TcpHasPath {
            uri: uri.to_owned(),
        });
    }
    if authority.contains('@') {
        return Err(EndpointError::HasUserinfo {
            uri: uri.to_owned(),
        });
    }
    let not_ip = |host: &str| EndpointError::TcpHostNotIp {
        uri: uri.to_owned(),
        host: host.to_owned(),
    };
    let (ip, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or_else(|| not_ip(authority))?;
        let ip = Ipv6Addr::from_str(host).map_err(|_| not_ip(host))?;
        let port = match after.strip_prefix(':') {
            Some(port) => Some(port),
            None if after.is_empty() => None,
            None => return Err(not_ip(authority)),
        };
        (IpAddr::V6(ip), port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        // A second ':' means an unbracketed IPv6 address.
        if port.is_some_and(|p| p.contains(':')) {
            return Err(not_ip(authority));
        }
        let ip = Ipv4Addr::from_str(host).map_err(|_| not_ip(host))?;
        (IpAddr::V4(ip), port)
    };
    let port = match port {
        None | Some("") => {
            return Err(EndpointError::TcpMissingPort {
                uri: uri.to_owned(),
            });
        }
        Some(port) => port,
    };
    let bad_port = || EndpointError::TcpBadPort {
        uri: uri.to_owned(),
        port: port.to_owned(),
    };
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad_port());
    }
    let port = u16::from_str(port).map_err(|_| bad_port())?;
    Ok(Endpoint::Tcp(SocketAddr::new(ip, port)))
}

/// The percent-decoded bytes of `s`, or `None` when a `%` is not followed
/// by two hex digits: `percent-encoding` passes such a `%` through
/// verbatim, RFC 3986 §2.1 does not allow it.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let well_formed = bytes.iter().enumerate().all(|(i, &b)| {
        b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    well_formed.then(|| percent_decode_str(s).collect())
}

/// Escaped in a displayed path: everything but RFC 3986 `pchar` and `/`.
const PATH_ESCAPES: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'!')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'+')
    .remove(b',')
    .remove(b';')
    .remove(b'=')
    .remove(b':')
    .remove(b'@')
    .remove(b'/');

impl fmt::Display for Endpoint {
    /// The canonical URI form: `unix:///path` or `tcp://IP:port`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "tcp://{addr}"),
            Self::Unix(path) => {
                let path = percent_encode(path.as_os_str().as_bytes(), PATH_ESCAPES);
                write!(f, "unix://{path}")
            }
        }
    }
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn unix(p: &str) -> Endpoint {
        Endpoint::Unix(PathBuf::from(p))
    }

    fn tcp(s: &str) -> Endpoint {
        Endpoint::Tcp(s.parse().expect("socket address"))
    }

    #[test]
    fn parses_valid_addresses() {
        let cases = [
            ("unix:///tmp/a.sock", unix("/tmp/a.sock")),
            ("unix:/tmp/a.sock", unix("/tmp/a.sock")),
            ("UNIX:///tmp/a.sock", unix("/tmp/a.sock")),
            ("unix:///rel/../x", unix("/rel/../x")),
            ("unix:///tmp/a%20b%25.sock", unix("/tmp/a b%.sock")),
            ("tcp://127.0.0.1:8000", tcp("127.0.0.1:8000")),
            ("tcp://[::1]:8000", tcp("[::1]:8000")),
            ("tcp://[fe80::1:2]:0", tcp("[fe80::1:2]:0")),
        ];
        for (input, want) in cases {
            let got = Endpoint::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(got, want, "{input}");
            assert_eq!(
                Endpoint::parse(&got.to_string()).ok(),
                Some(got),
                "{input} round trip"
            );
        }
        assert_eq!(unix("/tmp/a b.sock").to_string(), "unix:///tmp/a%20b.sock");
        assert_eq!(tcp("[::1]:8000").to_string(), "tcp://[::1]:8000");
    }

    #[test]
    fn rejects_invalid_addresses() {
        let long = format!("unix:///{}", "a".repeat(MAX_UNIX_PATH));
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("  ", "empty"),
            ("/tmp/a.sock", "no_scheme"),
            ("http://127.0.0.1:80", "unsupported_scheme"),
            ("npipe:foo", "unsupported_scheme"),
            ("unix://", "missing_path"),
            ("unix:", "missing_path"),
            ("unix://tmp/a.sock", "authority"),
            ("unix://host/tmp/a.sock", "authority"),
            ("unix://user@/tmp/a.sock", "authority"),
            ("unix:tmp/a.sock", "relative_path"),
            ("unix:///tmp/a.sock?x=1", "query_or_fragment"),
            ("unix:///tmp/a.sock#f", "query_or_fragment"),
            ("unix:///tmp/a%2", "invalid_path"),
            ("unix:///tmp/a%00", "invalid_path"),
            (&long, "path_too_long"),
            ("tcp:127.0.0.1:8000", "tcp_missing_authority"),
            ("tcp://localhost:8000", "tcp_host_not_ip"),
            ("tcp://::1:8000", "tcp_host_not_ip"),
            ("tcp://[127.0.0.1]:8000", "tcp_host_not_ip"),
            ("tcp://[::1]x", "tcp_host_not_ip"),
            ("tcp://:8000", "tcp_host_not_ip"),
            ("tcp://127.0.0.1", "tcp_missing_port"),
            ("tcp://127.0.0.1:", "tcp_missing_port"),
            ("tcp://[::1]", "tcp_missing_port"),
            ("tcp://127.0.0.1:+80", "tcp_bad_port"),
            ("tcp://127.0.0.1:65536", "tcp_bad_port"),
            ("tcp://127.0.0.1:8000/foo", "tcp_has_path"),
            ("tcp://127.0.0.1:8000/", "tcp_has_path"),
            ("tcp://u@127.0.0.1:8000", "userinfo"),
            ("tcp://127.0.0.1:8000?x", "query_or_fragment"),
        ];
        for (input, kind) in cases {
            match Endpoint::parse(input) {
                Ok(e) => panic!("{input:?} parsed as {e:?}"),
                Err(e) => assert_eq!(e.kind(), *kind, "{input:?}: {e}"),
            }
        }
        let max = format!("unix:///{}", "a".repeat(MAX_UNIX_PATH - 1));
        assert!(Endpoint::parse(&max).is_ok());
    }

    #[test]
    fn resolve_prefers_config_then_env() {
        let env: HashMap<&str, &str> = HashMap::from([(SOCKET_ENV, "unix:///env.sock")]);
        let from_env = |k: &str| env.get(k).map(|v| (*v).to_owned());
        let unset = |_: &str| None;
        let empty = |_: &str| Some(String::new());

        let got = Endpoint::resolve(Some("tcp://127.0.0.1:1"), &from_env).ok();
        assert_eq!(got, Some(tcp("127.0.0.1:1")));
        assert_eq!(
            Endpoint::resolve(None, &from_env).ok(),
            Some(unix("/env.sock"))
        );
        let bad_config = Endpoint::resolve(Some("bogus"), &from_env).map_err(|e| e.kind());
        assert_eq!(bad_config, Err("no_scheme"));
        let none = Endpoint::resolve(None, &unset).map_err(|e| e.kind());
        assert_eq!(none, Err("not_configured"));
        let none = Endpoint::resolve(None, &empty).map_err(|e| e.kind());
        assert_eq!(none, Err("not_configured"));
    }

    #[test]
    fn check_accepts_sockets_and_missing_paths_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("agent.sock");
        assert!(
            Endpoint::Unix(sock.clone()).check().is_ok(),
            "missing path is fine"
        );
        let _listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        assert!(Endpoint::Unix(sock).check().is_ok());

        let file = dir.path().join("file");
        std::fs::write(&file, b"").expect("write");
        for (path, found) in [
            (file, "regular file"),
            (dir.path().to_path_buf(), "directory"),
        ] {
            let err = Endpoint::Unix(path.clone())
                .check()
                .expect_err("not a socket");
            assert!(
                matches!(&err, EndpointError::NotASocket { path: p, found: f } if *p == path && *f == found)
            );
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{err}"
            );
        }
        assert!(tcp("127.0.0.1:1").check().is_ok());
    }

    /// Sends one request, which makes the lazy channel dial.
    async fn dial(channel: Channel) {
        use tower::ServiceExt;
        let request = tonic::codegen::http::Request::builder()
            .uri("/probe")
            .body(tonic::body::Body::empty())
            .expect("request");
        let _ = channel.oneshot(request).await;
    }

    #[tokio::test]
    async fn unix_channel_connects() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let channel = Endpoint::Unix(path)
            .channel(Duration::from_secs(5))
            .expect("channel");
        let client = tokio::spawn(dial(channel));
        let accepted = tokio::time::timeout(Duration::from_secs(10), listener.accept()).await;
        assert!(matches!(accepted, Ok(Ok(_))), "no connection accepted");
        client.abort();
    }

    #[tokio::test]
    async fn tcp_channel_connects() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let channel = Endpoint::Tcp(addr)
            .channel(Duration::from_secs(5))
            .expect("channel");
        let client = tokio::spawn(dial(channel));
        let accepted = tokio::time::timeout(Duration::from_secs(10), listener.accept()).await;
        assert!(matches!(accepted, Ok(Ok(_))), "no connection accepted");
        client.abort();
    }
}
