//! `webhook`: POST the step as JSON to a configured `http://` endpoint (a
//! ticketing bridge, a chat relay, a runbook automation) and record how it
//! answered.
//!
//! Guarantees:
//!
//! - every attempt carries `Idempotency-Key: <action_id>`, so a receiver can
//!   drop the duplicates that retries (or a run after a cancelled one)
//!   produce: that is what makes this actuator idempotent;
//! - a `2xx` is success; `5xx`, refused connections, timeouts and broken
//!   responses are retried up to `retries` times with a doubling backoff;
//!   any other status (`4xx`, `3xx`) is final;
//! - all attempts, backoffs included, finish within the step timeout (less
//!   a 5 % margin, so the attempts are recorded rather than a bare timeout);
//! - configured header values are secrets: they are never logged, never put
//!   in the outcome, and are masked if the receiver echoes them back.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use hyper::body::Bytes;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;
use tracing::warn;

use super::{Actuator, ActuatorError, Class};
use crate::http_client::{self, HttpError, Options, Response};
use crate::model::{Outcome, OutcomeKind, Step};

/// Bytes of the response body kept in the outcome.
const TAIL: usize = 1024;

/// Largest response body read; a receiver has no reason to send more.
const MAX_BODY: usize = 64 * 1024;

/// Most retries accepted: with a doubling backoff, more would only ever be
/// cut short by the step timeout.
const MAX_RETRIES: u32 = 10;

/// Headers the actuator sets itself.
const OWN_HEADERS: [&str; 2] = ["content-type", "idempotency-key"];

/// Replaces echoed header values in the response tail.
const MASK: &str = "[redacted]";

/// `[actuators.<name>] type = "webhook"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://host[:port][/path]` to POST to; `https://` is not supported
    /// (terminate TLS in a local relay or sidecar).
    pub url: String,
    /// Upper bound for one attempt (the step timeout bounds them all).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Further attempts after a `5xx`, a refused connection or a timeout.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Pause before the first retry, doubled before each next one.
    #[serde(default = "default_backoff", with = "humantime_serde")]
    pub backoff: Duration,
    /// Extra request headers, e.g. `Authorization`. Values are secrets:
    /// never logged or recorded.
    #[serde(default)]
    pub headers: BTreeMap<String, SecretString>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_retries() -> u32 {
    2
}

fn default_backoff() -> Duration {
    Duration::from_millis(500)
}

impl WebhookConfig {
    /// (field, problem) pairs; empty when valid. Never quotes a header
    /// value.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Err(reason) = http_client::check_url(&self.url) {
            out.push(("url", reason.to_string()));
        }
        if self.timeout.is_zero() {
            out.push(("timeout", "must be greater than zero".to_string()));
        }
        if self.retries > MAX_RETRIES {
            out.push(("retries", format!("must be at most {MAX_RETRIES}")));
        }
        for (name, value) in &self.headers {
            if OWN_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                out.push(("headers", format!("{name:?}: set by the actuator itself")));
            } else if let Err(reason) = http_client::check_header(name, value.expose_secret()) {
                out.push(("headers", format!("{name:?}: {reason}")));
            }
        }
        out
    }
}

/// POSTs steps to a webhook.
pub struct WebhookActuator {
    config: WebhookConfig,
}

impl WebhookActuator {
    /// From its config.
    pub fn new(config: WebhookConfig) -> Self {
        Self { config }
    }
}

/// The JSON document sent for `step`.
fn payload(step: &Step) -> serde_json::Value {
    json!({
        "action_id": step.action_id,
        "incident_id": step.incident_id,
        "symptom": step.symptom,
        "rung": step.rung,
        "target": step.target,
        "params": step.params,
        "dry_run": step.dry_run,
        "sent_by": "spire-healer",
    })
}

/// Pause before retry number `retry` (1-based): `backoff * 2^(retry-1)`,
/// saturating.
fn backoff_before(backoff: Duration, retry: u32) -> Duration {
    match 2u32.checked_pow(retry.saturating_sub(1)) {
        Some(factor) => backoff.saturating_mul(factor),
        None if backoff.is_zero() => Duration::ZERO,
        None => Duration::MAX,
    }
}

/// Why an attempt did not deliver.
enum Failure {
    /// The receiver answered with a non-2xx status.
    Status(Response),
    /// No usable answer.
    Http(HttpError),
}

impl Failure {
    fn retryable(&self) -> bool {
        match self {
            Failure::Status(r) => (500..600).contains(&r.status),
            Failure::Http(e) => matches!(
                e,
                HttpError::Connect { .. } | HttpError::Timeout { .. } | HttpError::Protocol(_)
            ),
        }
    }

    /// Closed-set label for logs: `status` or an [`HttpError::kind`].
    fn kind(&self) -> &'static str {
        match self {
            Failure::Status(_) => "status",
            Failure::Http(e) => e.kind(),
        }
    }

    fn status(&self) -> Option<u16> {
        match self {
            Failure::Status(r) => Some(r.status),
            Failure::Http(_) => None,
        }
    }
}

/// Why the actuator stopped trying.
#[derive(Clone, Copy)]
enum GaveUp {
    /// The answer is final (`4xx`, bad URL, oversized body).
    Final,
    /// Every allowed attempt failed.
    Retries,
    /// The step timeout leaves no room for another attempt.
    Deadline,
}

impl GaveUp {
    fn as_str(self) -> &'static str {
        match self {
            GaveUp::Final => "final",
            GaveUp::Retries => "retries",
            GaveUp::Deadline => "deadline",
        }
    }
}

impl WebhookActuator {
    /// The last `TAIL` bytes of `body` as text, with configured header
    /// values masked in case the receiver echoes the request.
    fn tail(&self, body: &[u8]) -> String {
        let mut text = String::from_utf8_lossy(body).into_owned();
        for value in self.config.headers.values() {
            let value = value.expose_secret();
            if !value.is_empty() {
                text = text.replace(value, MASK);
            }
        }
        let mut cut = text.len().saturating_sub(TAIL);
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text.split_off(cut)
    }

    fn delivered(&self, response: &Response, attempts: u32) -> Outcome {
        Outcome::ok(json!({
            "status": response.status,
            "attempts": attempts,
            "response_tail": self.tail(&response.body),
        }))
    }

    fn failed(&self, failure: &Failure, attempts: u32, gave_up: GaveUp) -> Outcome {
        let tries = if attempts == 1 {
            "1 attempt".to_string()
        } else {
            format!("{attempts} attempts")
        };
        match failure {
            Failure::Status(response) => Outcome {
                kind: OutcomeKind::Error,
                error: Some(format!(
                    "webhook answered HTTP {} ({tries})",
                    response.status
                )),
                detail: json!({
                    "status": response.status,
                    "attempts": attempts,
                    "gave_up": gave_up.as_str(),
                    "response_tail": self.tail(&response.body),
                }),
            },
            Failure::Http(e) => Outcome {
                kind: if matches!(e, HttpError::Timeout { .. }) {
                    OutcomeKind::Timeout
                } else {
                    OutcomeKind::Error
                },
                error: Some(format!("webhook failed: {} ({tries})", error_chain(e))),
                detail: json!({
                    "error_kind": e.kind(),
                    "attempts": attempts,
                    "gave_up": gave_up.as_str(),
                }),
            },
        }
    }
}

/// `e` and its sources, `: `-separated. [`HttpError`] never quotes header
/// values, and neither do its sources (I/O and hyper errors).
fn error_chain(e: &HttpError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[async_trait]
impl Actuator for WebhookActuator {
    fn name(&self) -> &'static str {
        "webhook"
    }

    /// A notification cannot make the target worse.
    fn class(&self) -> Class {
        Class::Gentle
    }

    /// POSTs the step, retrying as configured.
    ///
    /// Every failure to deliver is an [`Outcome`] (with `attempts`, the
    /// status or error kind, and `gave_up`), not an [`ActuatorError`], so
    /// the store keeps the detail.
    ///
    /// # Errors
    /// Only if the payload cannot be encoded.
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future closes the connection. The receiver
    /// may already have the request; the `Idempotency-Key` lets it drop the
    /// repeat.
    async fn execute(&self, step: &Step) -> Result<Outcome, ActuatorError> {
        let body = serde_json::to_vec(&payload(step))
            .map(Bytes::from)
            .map_err(|e| ActuatorError::Failed(format!("cannot encode webhook payload: {e}")))?;
        let mut headers: Vec<(&str, &str)> = vec![
            ("content-type", "application/json"),
            ("idempotency-key", step.action_id.as_str()),
        ];
        headers.extend(
            self.config
                .headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.expose_secret())),
        );
        // Leave a margin so this outcome, not the supervisor's bare timeout,
        // is what gets recorded.
        let deadline = Instant::now() + step.timeout.saturating_sub(step.timeout / 20);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let opts = Options::new(self.config.timeout.min(remaining)).max_body(MAX_BODY);
            let failure =
                match http_client::post(&self.config.url, &headers, body.clone(), &opts).await {
                    Ok(r) if (200..300).contains(&r.status) => {
                        return Ok(self.delivered(&r, attempts));
                    }
                    Ok(r) => Failure::Status(r),
                    Err(e) => Failure::Http(e),
                };
            if !failure.retryable() {
                return Ok(self.failed(&failure, attempts, GaveUp::Final));
            }
            if attempts > self.config.retries {
                return Ok(self.failed(&failure, attempts, GaveUp::Retries));
            }
            let pause = backoff_before(self.config.backoff, attempts);
            if Instant::now() + pause >= deadline {
                return Ok(self.failed(&failure, attempts, GaveUp::Deadline));
            }
            warn!(
                attempt = attempts,
                kind = failure.kind(),
                status = failure.status(),
                ?pause,
                "Webhook not delivered; retrying."
            );
            tokio::time::sleep(pause).await;
        }
    }
}

#[cfg(test)]
mod tests;
