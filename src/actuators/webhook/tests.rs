//! The webhook actuator against the raw test server.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::http_client::test_server::{Recorded, Reply, TestServer};
use crate::model::SymptomKind;

const SECRET: &str = "Bearer tok-5f9c2e7a";

fn step(timeout: Duration) -> Step {
    Step {
        action_id: "act-42".into(),
        incident_id: "inc-7".into(),
        symptom: SymptomKind::AgentUnreachable,
        rung: 2,
        actuator: "page".into(),
        target: "node-a".into(),
        params: json!({ "server": "spire-1", "n": 3 }),
        timeout,
        verify_within: Duration::from_secs(1),
        dry_run: false,
    }
}

fn config(url: String) -> WebhookConfig {
    WebhookConfig {
        url,
        timeout: Duration::from_secs(5),
        retries: 2,
        backoff: Duration::from_millis(10),
        headers: BTreeMap::from([
            ("Authorization".to_string(), SecretString::from(SECRET)),
            ("X-Team".to_string(), SecretString::from("spire-oncall")),
        ]),
    }
}

fn hook(url: String) -> WebhookActuator {
    WebhookActuator::new(config(url))
}

/// Answers with each status in turn, then repeats the last one.
fn statuses(codes: &'static [u16]) -> impl Fn(&Recorded) -> Reply + Send + Sync {
    let n = Arc::new(AtomicUsize::new(0));
    move |_| {
        let i = n.fetch_add(1, Ordering::SeqCst).min(codes.len() - 1);
        Reply::Status(codes[i], format!("answer {i}").into_bytes())
    }
}

fn assert_no_secrets(out: &Outcome) {
    let text = serde_json::to_string(out).expect("outcome serializes");
    for secret in ["tok-5f9c2e7a", "spire-oncall"] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
}

#[tokio::test]
async fn delivers_the_step_as_json_with_an_idempotency_key() {
    let server = TestServer::start(|_| Reply::Status(202, b"queued".to_vec())).await;
    let out = hook(server.url("/hooks/spire?src=healer"))
        .execute(&step(Duration::from_secs(5)))
        .await
        .expect("outcome");
    assert_eq!(out.kind, OutcomeKind::Ok, "{out:?}");
    assert_eq!(out.error, None);
    assert_eq!(out.detail["status"], 202);
    assert_eq!(out.detail["attempts"], 1);
    assert_eq!(out.detail["response_tail"], "queued");

    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    let req = &reqs[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/hooks/spire?src=healer");
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(req.header("idempotency-key"), Some("act-42"));
    assert_eq!(req.header("authorization"), Some(SECRET));
    assert_eq!(req.header("x-team"), Some("spire-oncall"));
    let body: serde_json::Value = serde_json::from_slice(&req.body).expect("JSON body");
    assert_eq!(body["action_id"], "act-42");
    assert_eq!(body["incident_id"], "inc-7");
    assert_eq!(body["symptom"], "agent_unreachable");
    assert_eq!(body["rung"], 2);
    assert_eq!(body["target"], "node-a");
    assert_eq!(body["params"], json!({ "server": "spire-1", "n": 3 }));
    assert_eq!(body["dry_run"], false);
    assert_eq!(body["sent_by"], "spire-healer");
    assert_eq!(body.as_object().map(|o| o.len()), Some(8), "{body}");
    assert_no_secrets(&out);
}

#[tokio::test]
async fn server_error_is_retried_with_the_same_key() {
    let server = TestServer::start_with(statuses(&[500, 200])).await;
    let out = hook(server.url("/"))
        .execute(&step(Duration::from_secs(5)))
        .await
        .expect("outcome");
    assert_eq!(out.kind, OutcomeKind::Ok, "{out:?}");
    assert_eq!(out.detail["attempts"], 2);
    assert_eq!(out.detail["status"], 200);
    assert_eq!(out.detail["response_tail"], "answer 1");
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2);
    assert!(
        reqs.iter()
            .all(|r| r.header("idempotency-key") == Some("act-42"))
    );
    assert_eq!(reqs[0].body, reqs[1].body);
}

#[tokio::test]
async fn client_error_is_final() {
    let server = TestServer::start_with(statuses(&[400, 200])).await;
    let out = hook(server.url("/"))
        .execute(&step(Duration::from_secs(5)))
        .await
        .expect("outcome");
    assert_eq!(out.kind, OutcomeKind::Error);
    assert!(
        out.error.as_deref().unwrap_or("").contains("HTTP 400"),
        "{out:?}"
    );
    assert_eq!(out.detail["status"], 400);
    assert_eq!(out.detail["attempts"], 1);
    assert_eq!(out.detail["gave_up"], "final");
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn persistent_server_error_exhausts_retries() {
    let server = TestServer::start_with(statuses(&[503])).await;
    let out = hook(server.url("/"))
        .execute(&step(Duration::from_secs(5)))
        .await
        .expect("outcome");
    assert_eq!(out.kind, OutcomeKind::Error);
    assert_eq!(out.detail["attempts"], 3);
    assert_eq!(out.detail["gave_up"], "retries");
    assert!(
        out.error
            .as_deref()
            .unwrap_or("")
            .contains("HTTP 503 (3 attempts)")
    );
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn hanging_server_times_out_within_the_step_bound() {
    let server = TestServer::start(|_| Reply::Hang).await;
    let bound = Duration::from_millis(400);
    let started = Instant::now();
    let out = hook(server.url("/"))
        .execute(&step(bound))
        .await
        .expect("outcome");
    let took = started.elapsed();
    assert!(took <= bound, "took {took:?}");
    assert_eq!(out.kind, OutcomeKind::Timeout, "{out:?}");
    assert_eq!(out.detail["error_kind"], "timeout");
    assert_eq!(out.detail["attempts"], 1);
    assert_eq!(out.detail["gave_up"], "deadline");
}

#[tokio::test]
async fn attempt_timeouts_are_retried() {
    let server = TestServer::start(|_| Reply::Hang).await;
    let mut c = config(server.url("/"));
    c.timeout = Duration::from_millis(100);
    let started = Instant::now();
    let out = WebhookActuator::new(c)
        .execute(&step(Duration::from_secs(5)))
        .await
        .expect("outcome");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(out.kind, OutcomeKind::Timeout);
    assert_eq!(out.detail["attempts"], 3);
    assert_eq!(out.detail["gave_up"], "retries");
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn refused_connection_is_retried_then_an_error() {
    let server = TestServer::start(|_| Reply::Status(200, Vec::new())).await;
    let url = server.url("/");
    server.stop().await;
    let started = Instant::now();
    let out = hook(url)
        .execute(&step(Duration::from_secs(5)))
        .await
        .expect("outcome");
    // Two pauses: 10 ms, then 20 ms.
    assert!(started.elapsed() >= Duration::from_millis(30));
    assert_eq!(out.kind, OutcomeKind::Error, "{out:?}");
    assert_eq!(out.detail["error_kind"], "connect");
    assert_eq!(out.detail["attempts"], 3);
    assert_eq!(out.detail["gave_up"], "retries");
    assert!(
        out.error
            .as_deref()
            .unwrap_or("")
            .contains("cannot connect")
    );
}

#[tokio::test]
async fn no_retry_when_the_backoff_would_overrun_the_step() {
    let server = TestServer::start_with(statuses(&[502])).await;
    let mut c = config(server.url("/"));
    c.backoff = Duration::from_secs(10);
    let started = Instant::now();
    let out = WebhookActuator::new(c)
        .execute(&step(Duration::from_secs(2)))
        .await
        .expect("outcome");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(out.detail["attempts"], 1);
    assert_eq!(out.detail["gave_up"], "deadline");
}

#[tokio::test]
async fn header_values_stay_out_of_the_outcome_even_when_echoed() {
    // A receiver that echoes the whole request back, on success and failure.
    for code in [200, 401, 500] {
        let server =
            TestServer::start_with(move |req| Reply::Status(code, req.raw.repeat(1))).await;
        let out = hook(server.url("/"))
            .execute(&step(Duration::from_secs(5)))
            .await
            .expect("outcome");
        assert_no_secrets(&out);
        let tail = out.detail["response_tail"].as_str().unwrap_or("");
        assert!(tail.contains("authorization: [redacted]"), "{tail}");
        assert!(tail.contains("idempotency-key: act-42"), "{tail}");
    }
    let shown = format!("{:?}", config("http://h/".into()));
    assert!(!shown.contains("tok-5f9c2e7a") && !shown.contains("spire-oncall"));
}

#[tokio::test]
async fn response_tail_is_bounded() {
    let mut body = "é".repeat(2000).into_bytes(); // 4000 bytes, 2-byte chars
    body.extend_from_slice(b"END");
    let server = TestServer::start(move |_| Reply::Status(200, body.clone())).await;
    let out = hook(server.url("/"))
        .execute(&step(Duration::from_secs(5)))
        .await
        .expect("outcome");
    let tail = out.detail["response_tail"].as_str().unwrap_or("");
    assert!(tail.len() <= TAIL, "{}", tail.len());
    assert!(tail.len() >= TAIL - 3);
    assert!(tail.ends_with("éEND"));
}

#[test]
fn backoff_doubles_and_saturates() {
    let b = Duration::from_millis(500);
    let pauses: Vec<_> = (1..=4).map(|r| backoff_before(b, r)).collect();
    assert_eq!(
        pauses,
        [500, 1000, 2000, 4000].map(Duration::from_millis).to_vec()
    );
    assert_eq!(backoff_before(b, 40), Duration::MAX);
    assert_eq!(backoff_before(Duration::ZERO, 3), Duration::ZERO);
}

#[test]
fn config_defaults_and_problems() {
    let c: WebhookConfig = toml::from_str(
        r#"
        url = "http://127.0.0.1:9000/hook"
        [headers]
        Authorization = "Bearer tok-5f9c2e7a"
        "#,
    )
    .expect("parses");
    assert_eq!(c.timeout, Duration::from_secs(5));
    assert_eq!(c.retries, 2);
    assert_eq!(c.backoff, Duration::from_millis(500));
    assert!(c.problems().is_empty(), "{:?}", c.problems());

    let unknown = toml::from_str::<WebhookConfig>("url = \"http://h/\"\nmethod = \"PUT\"");
    assert!(unknown.is_err());

    let c = WebhookConfig {
        url: "https://hooks.example/x".into(),
        timeout: Duration::ZERO,
        retries: 11,
        backoff: Duration::ZERO,
        headers: BTreeMap::from([
            ("Content-Type".into(), SecretString::from("text/plain")),
            ("Idempotency-Key".into(), SecretString::from("k")),
            ("Host".into(), SecretString::from("h")),
            ("bad name".into(), SecretString::from("v")),
            ("X-Token".into(), SecretString::from("tok-5f9c2e7a\n")),
        ]),
    };
    let problems = c.problems();
    let fields: Vec<&str> = problems.iter().map(|(f, _)| *f).collect();
    assert_eq!(
        fields,
        [
            "url", "timeout", "retries", "headers", "headers", "headers", "headers", "headers"
        ]
    );
    assert!(problems.iter().all(|(_, p)| !p.contains("tok-5f9c2e7a")));
}

#[test]
fn class_is_gentle() {
    let a = hook("http://127.0.0.1:1/".into());
    assert_eq!(a.class(), Class::Gentle);
    assert_eq!(a.name(), "webhook");
}
