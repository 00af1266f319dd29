//! The client against the raw test server: every outcome class.

use std::time::Duration;

use super::test_server::{Reply, TestServer};
use super::*;

fn opts() -> Options {
    Options::new(Duration::from_secs(5))
}

#[tokio::test]
async fn ok_returns_status_and_body() {
    let server =
        TestServer::start(|path| Reply::Status(200, format!("you asked {path}").into_bytes()))
            .await;
    let resp = get(&server.url("/metrics?x=1"), &opts())
        .await
        .expect("200");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, b"you asked /metrics?x=1");
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn non_200_is_a_response_not_an_error() {
    let server = TestServer::start(|_| Reply::Status(500, b"{\"agent\":{}}".to_vec())).await;
    let resp = get(&server.url("/ready"), &opts())
        .await
        .expect("500 is an answer");
    assert_eq!(resp.status, 500);
    assert_eq!(resp.body, b"{\"agent\":{}}");
}

#[tokio::test]
async fn empty_path_asks_for_root() {
    let server = TestServer::start(|path| Reply::Status(200, path.as_bytes().to_vec())).await;
    let url = server.url("");
    let resp = get(&url, &opts()).await.expect("200");
    assert_eq!(resp.body, b"/");
}

#[tokio::test]
async fn silent_peer_times_out() {
    let server = TestServer::start(|_| Reply::Hang).await;
    let started = tokio::time::Instant::now();
    let err = get(
        &server.url("/live"),
        &Options::new(Duration::from_millis(200)),
    )
    .await
    .expect_err("no answer");
    assert_eq!(err.kind(), "timeout", "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn dripping_body_hits_the_total_deadline() {
    let server = TestServer::start(|_| Reply::Drip(Duration::from_millis(50))).await;
    let err = get(
        &server.url("/metrics"),
        &Options::new(Duration::from_millis(300)),
    )
    .await
    .expect_err("too slow");
    assert_eq!(err.kind(), "timeout", "{err}");
}

#[tokio::test]
async fn declared_oversized_body_is_refused_up_front() {
    let server = TestServer::start(|_| Reply::Status(200, vec![b'x'; 4096])).await;
    let err = get(&server.url("/metrics"), &opts().max_body(1024))
        .await
        .expect_err("too large");
    assert_eq!(err.kind(), "too_large", "{err}");
    // Exactly at the cap is fine.
    let resp = get(&server.url("/metrics"), &opts().max_body(4096))
        .await
        .expect("at the cap");
    assert_eq!(resp.body.len(), 4096);
}

#[tokio::test]
async fn endless_body_stops_at_the_cap() {
    let server = TestServer::start(|_| Reply::Endless).await;
    let err = get(&server.url("/metrics"), &opts().max_body(256 * 1024))
        .await
        .expect_err("endless");
    assert_eq!(err.kind(), "too_large", "{err}");
}

#[tokio::test]
async fn garbage_is_a_protocol_error() {
    for raw in [
        b"garbage\r\n\r\n".to_vec(),
        b"SSH-2.0-OpenSSH_9.6\r\n".to_vec(),
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort".to_vec(),
        b"HTTP/1.1 abc\r\n\r\n".to_vec(),
        Vec::new(),
    ] {
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let server = TestServer::start(move |_| Reply::Raw(raw.clone())).await;
        let err = get(&server.url("/"), &opts()).await.expect_err(&shown);
        assert_eq!(err.kind(), "protocol", "{shown:?}: {err}");
    }
}

#[tokio::test]
async fn refused_connection_is_a_connect_error() {
    let server = TestServer::start(|_| Reply::Status(200, Vec::new())).await;
    let url = server.url("/live");
    server.stop().await;
    let err = get(&url, &opts()).await.expect_err("nobody listens");
    assert_eq!(err.kind(), "connect", "{err}");
    assert!(
        std::error::Error::source(&err).is_some(),
        "keeps the io error"
    );
}

#[tokio::test]
async fn bad_urls_are_rejected_before_dialling() {
    for url in [
        "https://127.0.0.1:8080/ready",
        "ftp://127.0.0.1/",
        "127.0.0.1:8080/ready",
        "http://",
        "http://user:pw@127.0.0.1:8080/",
        "http://127.0.0.1:99999/",
        "http://127.0.0.1:0/",
        "http://127.0.0.1:x/",
        "not a url",
        "",
    ] {
        let err = get(url, &opts()).await.expect_err(url);
        assert_eq!(err.kind(), "invalid_url", "{url}: {err}");
    }
    let err = get("https://localhost/", &opts()).await.expect_err("https");
    assert!(err.to_string().contains("https is not supported"), "{err}");
}

#[test]
fn targets_parse() {
    let t = Target::parse("http://[::1]:9988/metrics").expect("ipv6");
    assert_eq!((t.host.as_str(), t.port), ("::1", 9988));
    assert_eq!(t.authority, "[::1]:9988");
    assert_eq!(t.path, "/metrics");
    assert_eq!(t.authority_host(), "[::1]");
    let t = Target::parse("http://spire-agent.spire.svc").expect("default port");
    assert_eq!(
        (t.host.as_str(), t.port, t.path.as_str()),
        ("spire-agent.spire.svc", 80, "/")
    );
}

#[test]
fn error_kinds_are_closed() {
    let kinds = [
        HttpError::InvalidUrl {
            url: String::new(),
            reason: "x",
        }
        .kind(),
        HttpError::Connect {
            addr: String::new(),
            source: std::io::Error::other("x"),
        }
        .kind(),
        HttpError::Timeout {
            after: Duration::ZERO,
        }
        .kind(),
        HttpError::TooLarge { limit: 0 }.kind(),
        HttpError::InvalidHeader {
            name: String::new(),
            reason: "x",
        }
        .kind(),
    ];
    assert_eq!(
        kinds,
        [
            "invalid_url",
            "connect",
            "timeout",
            "too_large",
            "invalid_header"
        ]
    );
}

// === POST ===

#[tokio::test]
async fn post_sends_body_and_headers() {
    let server = TestServer::start_with(|req| Reply::Status(201, req.body.clone())).await;
    let resp = post(
        &server.url("/hook?x=1"),
        &[
            ("content-type", "application/json"),
            ("Authorization", "Bearer s3cret"),
            ("x-multi", "a"),
            ("x-multi", "b"),
        ],
        b"{\"a\":1}".to_vec(),
        &opts(),
    )
    .await
    .expect("201");
    assert_eq!(resp.status, 201);
    assert_eq!(resp.body, b"{\"a\":1}");
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    let req = &reqs[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/hook?x=1");
    assert_eq!(req.body, b"{\"a\":1}");
    assert_eq!(req.header("content-length"), Some("7"));
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(req.header("authorization"), Some("Bearer s3cret"));
    assert_eq!(req.header("user-agent"), Some(USER_AGENT));
    let multi: Vec<&str> = req
        .headers
        .iter()
        .filter(|(n, _)| n == "x-multi")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(multi, ["a", "b"]);
}

#[tokio::test]
async fn get_still_sends_no_body() {
    let server = TestServer::start(|_| Reply::Status(200, Vec::new())).await;
    get(&server.url("/live"), &opts()).await.expect("200");
    let req = &server.requests()[0];
    assert_eq!(req.method, "GET");
    assert!(req.body.is_empty());
    assert_eq!(req.header("content-length"), None);
}

#[tokio::test]
async fn post_to_a_silent_peer_times_out() {
    let server = TestServer::start(|_| Reply::Hang).await;
    let err = post(
        &server.url("/hook"),
        &[],
        "x",
        &Options::new(Duration::from_millis(200)),
    )
    .await
    .expect_err("no answer");
    assert_eq!(err.kind(), "timeout", "{err}");
}

#[tokio::test]
async fn bad_headers_are_rejected_before_dialling_without_their_value() {
    let server = TestServer::start(|_| Reply::Status(200, Vec::new())).await;
    for (name, value) in [
        ("bad name", "v"),
        ("", "v"),
        ("x-token", "line\r\nbreak-s3cret"),
        ("Host", "evil"),
        ("content-length", "1"),
        ("transfer-encoding", "chunked"),
    ] {
        let err = post(&server.url("/"), &[(name, value)], "", &opts())
            .await
            .expect_err(name);
        assert_eq!(err.kind(), "invalid_header", "{name}: {err}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert!(!format!("{err:?}").contains("s3cret"), "{err:?}");
    }
    assert_eq!(server.hits(), 0);
}

#[test]
fn checks_match_what_the_client_accepts() {
    assert_eq!(check_url("http://127.0.0.1:8080/hook"), Ok(()));
    assert!(check_url("https://hooks.example/x").is_err());
    assert!(check_url("nope").is_err());
    assert_eq!(check_header("Authorization", "Bearer x"), Ok(()));
    assert!(check_header("Host", "x").is_err());
    assert!(check_header("x-a", "\n").is_err());
}
