//! `[telemetry.otlp]`: traces over OTLP/gRPC, and the standard
//! `OTEL_*` variables that override it.
//!
//! Off unless the section is present or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
//! or `OTEL_EXPORTER_OTLP_ENDPOINT` is set; `OTEL_SDK_DISABLED=true` or
//! `OTEL_TRACES_EXPORTER=none` turn it off either way. A variable wins over
//! the file (as `SPIRE_HEALER_DATABASE_URL` does), a traces-specific one
//! over the generic one. Every value is resolved here, through the
//! injectable environment, and handed to the exporter explicitly.

use std::collections::BTreeMap;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{ConfigError, Env, MAX_TIMEOUT};

/// The OTLP/gRPC default (the spec's `localhost:4317`).
pub const DEFAULT_ENDPOINT: &str = "http://localhost:4317";
/// The longest batch delay: spans older than this are not "live" any more.
const MAX_BATCH_DELAY: Duration = Duration::from_secs(60);
/// The largest queue: at a few hundred bytes a span, well under a GiB.
const MAX_QUEUE: usize = 1_000_000;

/// `[telemetry]`: exports beyond `/metrics` and the logs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Traces over OTLP/gRPC (`[telemetry.otlp]`); off when unset, unless
    /// an `OTEL_EXPORTER_OTLP_*ENDPOINT` variable names a collector.
    #[serde(default)]
    pub otlp: Option<OtlpConfig>,
}

/// `[telemetry.otlp]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// The collector's OTLP/gRPC endpoint, `http://host:port`
    /// ([`DEFAULT_ENDPOINT`] when unset). Plain gRPC only: TLS to the
    /// collector is not supported, so point it at a local collector or
    /// agent.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// `service.name` of every span (`OTEL_SERVICE_NAME` wins).
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Deadline of one export call.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// gRPC metadata sent with every export, e.g. a collector's API key.
    #[serde(default)]
    pub headers: BTreeMap<String, SecretString>,
    /// Spans waiting for export at most; the loop never waits for the
    /// exporter, so what does not fit is dropped and counted
    /// (`spire_healer_trace_spans_dropped_total{reason="queue_full"}`).
    #[serde(default = "default_max_queue_size")]
    pub max_queue_size: usize,
    /// How long finished spans wait to be sent in one batch.
    #[serde(default = "default_batch_delay", with = "humantime_serde")]
    pub batch_delay: Duration,
}

fn default_service_name() -> String {
    "spire-healer".into()
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_max_queue_size() -> usize {
    2048
}

fn default_batch_delay() -> Duration {
    Duration::from_secs(5)
}

impl Default for OtlpConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            service_name: default_service_name(),
            timeout: default_timeout(),
            headers: BTreeMap::new(),
            max_queue_size: default_max_queue_size(),
            batch_delay: default_batch_delay(),
        }
    }
}

/// The trace export in force, after the environment.
#[derive(Debug, Clone)]
pub struct OtlpSettings {
    /// `http://host:port` of the collector's OTLP/gRPC receiver.
    pub endpoint: String,
    /// `service.name`.
    pub service_name: String,
    /// Deadline of one export call.
    pub timeout: Duration,
    /// gRPC metadata of every export: lowercase names, valid values.
    pub headers: Vec<(String, SecretString)>,
    /// Spans waiting for export at most.
    pub max_queue_size: usize,
    /// Batch delay.
    pub batch_delay: Duration,
}

/// The first of `vars` that is set to something other than blanks: (name,
/// value).
fn first_set(env: Env<'_>, vars: &[&'static str]) -> Option<(&'static str, String)> {
    vars.iter().find_map(|v| {
        env(v)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .map(|s| (*v, s))
    })
}

/// ` (from VAR)` when a value came from the environment.
fn from(var: Option<&str>) -> String {
    var.map(|v| format!(" (from {v})")).unwrap_or_default()
}

/// Resolves `[telemetry.otlp]` (`file`) and the `OTEL_*` variables into
/// the export in force; `None` when traces are off. Pushes every problem
/// onto `errors`, with keys under `telemetry.otlp`.
pub(super) fn resolve(
    file: Option<&OtlpConfig>,
    env: Env<'_>,
    errors: &mut Vec<ConfigError>,
) -> Option<OtlpSettings> {
    let is =
        |var: &str, value: &str| env(var).is_some_and(|v| v.trim().eq_ignore_ascii_case(value));
    if is("OTEL_SDK_DISABLED", "true") || is("OTEL_TRACES_EXPORTER", "none") {
        return None;
    }
    let endpoint_var = first_set(
        env,
        &[
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ],
    );
    if file.is_none() && endpoint_var.is_none() {
        return None;
    }
    let defaults = OtlpConfig::default();
    let file = file.unwrap_or(&defaults);
    let before = errors.len();

    let (var, endpoint) = match endpoint_var {
        Some((var, v)) => (Some(var), v),
        None => (
            None,
            file.endpoint
                .clone()
                .unwrap_or_else(|| DEFAULT_ENDPOINT.into()),
        ),
    };
    if let Err(reason) = check_endpoint(&endpoint) {
        errors.push(ConfigError::invalid(
            "telemetry.otlp.endpoint",
            format!("{endpoint:?}{}: {reason}", from(var)),
        ));
    }

    let service_name = first_set(env, &["OTEL_SERVICE_NAME"])
        .map_or_else(|| file.service_name.clone(), |(_, v)| v);
    if service_name.trim().is_empty() {
        errors.push(ConfigError::invalid(
            "telemetry.otlp.service_name",
            "must not be empty",
        ));
    }

    let millis =
        |key: &str, vars: &[&'static str], default: Duration, errors: &mut Vec<_>| match first_set(
            env, vars,
        ) {
            None => default,
            Some((var, v)) => match v.parse::<u64>() {
                Ok(ms) => Duration::from_millis(ms),
                Err(_) => {
                    errors.push(ConfigError::invalid(
                        format!("telemetry.otlp.{key}"),
                        format!(
                            "{v:?}{}: must be a whole number of milliseconds",
                            from(Some(var))
                        ),
                    ));
                    default
                }
            },
        };
    let timeout = millis(
        "timeout",
        &[
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ],
        file.timeout,
        errors,
    );
    let batch_delay = millis(
        "batch_delay",
        &["OTEL_BSP_SCHEDULE_DELAY"],
        file.batch_delay,
        errors,
    );
    for (key, value, max) in [
        ("timeout", timeout, MAX_TIMEOUT),
        ("batch_delay", batch_delay, MAX_BATCH_DELAY),
    ] {
        if value.is_zero() {
            errors.push(ConfigError::invalid(
                format!("telemetry.otlp.{key}"),
                "must be greater than zero",
            ));
        } else {
            super::check_max("telemetry.otlp", key, value, max, errors);
        }
    }

    let max_queue_size = match first_set(env, &["OTEL_BSP_MAX_QUEUE_SIZE"]) {
        None => file.max_queue_size,
        Some((var, v)) => v.parse().unwrap_or_else(|_| {
            errors.push(ConfigError::invalid(
                "telemetry.otlp.max_queue_size",
                format!("{v:?}{}: must be a whole number", from(Some(var))),
            ));
            file.max_queue_size
        }),
    };
    if !(1..=MAX_QUEUE).contains(&max_queue_size) {
        errors.push(ConfigError::invalid(
            "telemetry.otlp.max_queue_size",
            format!("{max_queue_size} is out of range (1 to {MAX_QUEUE})"),
        ));
    }

    // The file's headers, then the variable's over them (same name: the
    // variable wins).
    let mut headers: BTreeMap<String, (Option<&str>, SecretString)> = file
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), (None, v.clone())))
        .collect();
    if let Some((var, text)) = first_set(
        env,
        &[
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            "OTEL_EXPORTER_OTLP_HEADERS",
        ],
    ) {
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some((k, v)) => {
                    let v = percent_encoding::percent_decode_str(v.trim()).decode_utf8_lossy();
                    headers.insert(k.trim().to_string(), (Some(var), v.into_owned().into()));
                }
                None => errors.push(ConfigError::invalid(
                    "telemetry.otlp.headers",
                    format!("an entry of {var} is not name=value"),
                )),
            }
        }
    }
    for (name, (var, value)) in &headers {
        if let Err(reason) = check_header(name, value.expose_secret()) {
            errors.push(ConfigError::invalid(
                format!("telemetry.otlp.headers.{name}"),
                format!("{reason}{}", from(*var)),
            ));
        }
    }

    (errors.len() == before).then(|| OtlpSettings {
        endpoint,
        service_name,
        timeout,
        headers: headers.into_iter().map(|(k, (_, v))| (k, v)).collect(),
        max_queue_size,
        batch_delay,
    })
}

/// `http://host[:port]`, nothing after the authority.
fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let uri: hyper::Uri = endpoint.parse().map_err(|e| format!("not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(
                "TLS to the collector is not supported; use http:// to a local \
                        collector or agent"
                    .into(),
            );
        }
        _ => return Err("must start with http://".into()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("names no host".into());
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err("must not have a path (OTLP/gRPC has none)".into());
    }
    Ok(())
}

/// A gRPC metadata entry: a lowercase ASCII name of token characters (not
/// a binary `-bin` one) and a visible ASCII value.
fn check_header(name: &str, value: &str) -> Result<(), String> {
    let token = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c);
    if name.is_empty() || !name.chars().all(token) || name.ends_with("-bin") {
        return Err(format!(
            "{name:?} is not a gRPC metadata name (lowercase a-z, 0-9, '-', '_', '.')"
        ));
    }
    if !value
        .chars()
        .all(|c| c == ' ' || c == '\t' || c.is_ascii_graphic())
    {
        return Err("the value must be visible ASCII".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::Config;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    /// A minimal valid config plus `extra`.
    fn config(extra: &str) -> String {
        format!(
            "[database]\nurl = \"sqlite:///tmp/healer.db\"\n\n\
             [[agents]]\nname = \"node-a\"\naddress = \"unix:///run/spire/agent.sock\"\n\n{extra}"
        )
    }

    fn check(text: &str, pairs: &[(&str, &str)]) -> Result<Option<OtlpSettings>, Vec<String>> {
        Config::check(text, "t.toml", &env(pairs))
            .map(|r| r.otlp)
            .map_err(|e| e.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn off_by_default() {
        assert!(check(&config(""), &[]).unwrap().is_none());
    }

    #[test]
    fn the_section_turns_it_on_with_defaults() {
        let s = check(&config("[telemetry.otlp]\n"), &[]).unwrap().unwrap();
        assert_eq!(s.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(s.service_name, "spire-healer");
        assert_eq!(s.timeout, Duration::from_secs(10));
        assert_eq!(s.max_queue_size, 2048);
        assert_eq!(s.batch_delay, Duration::from_secs(5));
        assert!(s.headers.is_empty());
    }

    #[test]
    fn file_values() {
        let s = check(
            &config(
                "[telemetry.otlp]\nendpoint = \"http://127.0.0.1:4317\"\nservice_name = \"healer-a\"\n\
                 timeout = \"3s\"\nmax_queue_size = 10\nbatch_delay = \"200ms\"\n\
                 headers = { x-api-key = \"k1\" }\n",
            ),
            &[],
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.endpoint, "http://127.0.0.1:4317");
        assert_eq!(s.service_name, "healer-a");
        assert_eq!(s.timeout, Duration::from_secs(3));
        assert_eq!(s.max_queue_size, 10);
        assert_eq!(s.batch_delay, Duration::from_millis(200));
        assert_eq!(s.headers.len(), 1);
        assert_eq!(s.headers[0].0, "x-api-key");
        assert_eq!(s.headers[0].1.expose_secret(), "k1");
    }

    #[test]
    fn the_endpoint_variable_alone_turns_it_on() {
        let s = check(
            &config(""),
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")],
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.endpoint, "http://collector:4317");
    }

    #[test]
    fn variables_win_over_the_file_and_traces_ones_over_generic_ones() {
        let s = check(
            &config(
                "[telemetry.otlp]\nendpoint = \"http://file:4317\"\ntimeout = \"3s\"\n\
                 headers = { a = \"file\", b = \"file\" }\n",
            ),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4317"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "1500"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "b=env%20value, c=3"),
                ("OTEL_SERVICE_NAME", "from-env"),
                ("OTEL_BSP_SCHEDULE_DELAY", "100"),
                ("OTEL_BSP_MAX_QUEUE_SIZE", "64"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.endpoint, "http://traces:4317");
        assert_eq!(s.timeout, Duration::from_millis(1500));
        assert_eq!(s.service_name, "from-env");
        assert_eq!(s.batch_delay, Duration::from_millis(100));
        assert_eq!(s.max_queue_size, 64);
        let headers: Vec<(&str, &str)> = s
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.expose_secret()))
            .collect();
        assert_eq!(headers, [("a", "file"), ("b", "env value"), ("c", "3")]);
    }

    #[test]
    fn disabled_by_the_standard_variables() {
        let text = config("[telemetry.otlp]\n");
        for pair in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            assert!(check(&text, &[pair]).unwrap().is_none(), "{pair:?}");
        }
        assert!(
            check(&text, &[("OTEL_SDK_DISABLED", "false")])
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn every_problem_at_once() {
        let errors = check(
            &config(
                "[telemetry.otlp]\nendpoint = \"https://collector:4317\"\nservice_name = \" \"\n\
                 timeout = \"0s\"\nmax_queue_size = 0\nbatch_delay = \"2m\"\n\
                 headers = { Bad = \"v\" }\n",
            ),
            &[],
        )
        .unwrap_err();
        let joined = errors.join("\n");
        for want in [
            "telemetry.otlp.endpoint",
            "TLS to the collector is not supported",
            "telemetry.otlp.service_name",
            "telemetry.otlp.timeout",
            "telemetry.otlp.max_queue_size",
            "telemetry.otlp.batch_delay",
            "telemetry.otlp.headers.Bad",
        ] {
            assert!(joined.contains(want), "{want} missing from:\n{joined}");
        }
        assert_eq!(errors.len(), 6, "{joined}");
    }

    #[test]
    fn bad_variables_are_named() {
        let errors = check(
            &config(""),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "novalue"),
            ],
        )
        .unwrap_err();
        let joined = errors.join("\n");
        assert!(
            joined.contains("(from OTEL_EXPORTER_OTLP_ENDPOINT)"),
            "{joined}"
        );
        assert!(
            joined.contains("(from OTEL_EXPORTER_OTLP_TIMEOUT)"),
            "{joined}"
        );
        assert!(
            joined.contains("OTEL_EXPORTER_OTLP_HEADERS is not name=value"),
            "{joined}"
        );
    }

    #[test]
    fn unknown_and_mistyped_keys_are_reported_with_their_position() {
        let errors = check(
            &config("[telemetry.otlp]\nendpont = \"http://x:4317\"\ntimeout = 5\n"),
            &[],
        )
        .unwrap_err();
        let joined = errors.join("\n");
        assert!(joined.contains("telemetry.otlp.endpont"), "{joined}");
        assert!(joined.contains("telemetry.otlp.timeout"), "{joined}");
        assert!(
            joined.contains("telemetry.otlp.endpont (line 9, column 1)"),
            "{joined}"
        );
        assert!(
            joined.contains("telemetry.otlp.timeout (line 10, column 11)"),
            "{joined}"
        );
        assert_eq!(errors.len(), 2, "{joined}");
    }

    #[test]
    fn other_telemetry_keys_are_unknown() {
        let errors = check(&config("[telemetry]\notel = 1\n"), &[]).unwrap_err();
        assert_eq!(
            errors,
            ["telemetry.otel (line 9, column 1): unknown key, expected otlp"]
        );
    }

    #[test]
    fn endpoints() {
        for ok in [
            "http://127.0.0.1:4317",
            "http://collector",
            "http://[::1]:4317/",
        ] {
            assert_eq!(check_endpoint(ok), Ok(()), "{ok}");
        }
        for bad in [
            "127.0.0.1:4317",
            "grpc://x:4317",
            "http://x:4317/v1/traces",
            "http://",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }
}
