//! Logs and traces: the global `tracing` subscriber, and its OpenTelemetry
//! export over OTLP/gRPC when `[telemetry.otlp]` (or an
//! `OTEL_EXPORTER_OTLP_*ENDPOINT` variable) names a collector.
//!
//! # What is exported
//!
//! Three kinds of spans of the loop, and nothing else (sensor, HTTP and
//! API spans stay in the logs):
//!
//! - `tick`: one pass of the loop. A root span; ticks where nothing
//!   happened (no incident opened or closed, no action started or
//!   verified, no event logged) are dropped before the queue, so an idle
//!   supervisor exports nothing.
//! - `incident`: a root span from the moment an incident opens until it
//!   closes, with `incident.id`, `symptom`, `subject`, `severity`,
//!   `predicted_outage` and, at the end, `resolution`. It links to the
//!   tick that opened it. An incident resumed from the store after a
//!   restart gets a new span (same `incident.id`, `resumed = true`): the
//!   span of the previous process ended with it.
//! - `action`: a child of its incident's span, from the decision until its
//!   verification, with `action.id`, `incident.id`, `actuator`, `rung`,
//!   `target`, `dry_run` and, as they are known, `outcome` and
//!   `verification`. It links to the tick that launched it. So one
//!   incident's trace shows its whole ladder.
//!
//! # Never blocking the loop
//!
//! Finished spans go to a bounded queue that a background thread exports
//! in batches (the SDK's `BatchSpanProcessor`). The SDK counts what it
//! drops only privately, so a gate in front of it keeps the number of
//! spans not yet handed to the exporter within the queue size and drops,
//! and counts, what would not fit:
//! `spire_healer_trace_spans_dropped_total{reason="queue_full"}`. Spans of
//! a failed export call (the collector is away, or refused them) are
//! counted as `reason="export_failed"`.
//!
//! # Logs
//!
//! JSON log lines carry `trace_id` and `span_id` of the innermost exported
//! span they were logged in (none outside one, or with traces off).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_otlp::{WithExportConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanExporter,
    SpanProcessor,
};
use prometheus::IntCounter;
use secrecy::ExposeSecret;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer, filter};

use super::{LogFormat, Metrics};
use crate::config::OtlpSettings;

/// The spans exported: names of spans of `crate::supervisor`.
pub const EXPORTED_SPANS: [&str; 3] = ["tick", "incident", "action"];

/// The trace pipeline could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The OTLP exporter refused its settings.
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// A header is not valid gRPC metadata (config validation checks this).
    #[error("header {0:?} is not valid gRPC metadata")]
    Header(String),
}

/// The installed pipeline; [`shutdown`](Self::shutdown) flushes it.
#[must_use = "spans are flushed only by Tracing::shutdown"]
#[derive(Debug, Default)]
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
}

impl Tracing {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is queued and stops the exporter, within `bound`
    /// (spans still queued then are lost). Call after the loop has
    /// stopped: its incident and action spans end when it drops them.
    pub async fn shutdown(self, bound: Duration) {
        let Some(provider) = self.provider else {
            return;
        };
        // The SDK's shutdown blocks its caller while the exporter, a tonic
        // client, needs this runtime: run it on a blocking thread.
        let done = tokio::time::timeout(
            bound + Duration::from_millis(500),
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(bound)),
        )
        .await;
        match done {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "Flushing traces failed."),
            Ok(Err(e)) => tracing::warn!(error = %e, "Flushing traces failed."),
            Err(_) => tracing::warn!(?bound, "Flushing traces took too long; gave up."),
        }
    }
}

/// Installs the global `tracing` subscriber: logs on stderr in `format`
/// (`RUST_LOG` overrides `default_level`), and, with `otlp`, the span
/// export. A second call (tests) leaves the first subscriber in place.
///
/// Must run inside a Tokio runtime when `otlp` is set (the gRPC client
/// lives on it).
///
/// # Errors
/// The exporter cannot be built from `otlp`.
pub fn init(
    format: LogFormat,
    default_level: &str,
    otlp: Option<&OtlpSettings>,
    metrics: &Metrics,
) -> Result<Tracing, TraceError> {
    let built = otlp.map(|settings| provider(settings, metrics)).transpose();
    let provider = built.as_ref().ok().and_then(Option::as_ref);
    // Logs are installed even when the exporter cannot be built, so that
    // the caller can log why.
    let _ = tracing_subscriber::registry()
        .with(provider.map(otel_layer))
        .with(log_layer(format, default_level))
        .try_init();
    Ok(Tracing { provider: built? })
}

/// A subscriber for logs only, for the current thread until the guard
/// drops: what is logged before the configuration (and with it the trace
/// export) is known.
pub fn init_scoped(format: LogFormat, default_level: &str) -> tracing::subscriber::DefaultGuard {
    tracing_subscriber::registry()
        .with(log_layer(format, default_level))
        .set_default()
}

/// The stderr log layer, filtered by `RUST_LOG` or `default_level`. Its
/// filter is its own, so the log level never hides the exported spans.
fn log_layer<S>(format: LogFormat, default_level: &str) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // Colour only for a person at a terminal that can show it.
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none()
        && std::env::var("TERM").map_or(true, |t| t != "dumb");
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => fmt.with_filter(filter).boxed(),
        LogFormat::Json => {
            let json = fmt.json().flatten_event(true);
            let inner = tracing_subscriber::fmt::format().json().flatten_event(true);
            json.event_format(WithTraceIds(inner))
                .with_filter(filter)
                .boxed()
        }
    }
}

/// The OpenTelemetry layer: only [`EXPORTED_SPANS`], and events at INFO
/// and above inside them (as span events).
fn otel_layer<S>(provider: &SdkTracerProvider) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let exported = filter::filter_fn(|m| {
        if m.is_span() {
            m.target().starts_with("spire_healer::supervisor") && EXPORTED_SPANS.contains(&m.name())
        } else {
            *m.level() <= Level::INFO
        }
    });
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("spire-healer"))
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_location(false)
        // Our `target` attribute (an action's target) is not the module path.
        .with_target(false)
        .with_filter(exported)
        .boxed()
}

/// Exporter → batch processor → gate → provider.
fn provider(settings: &OtlpSettings, metrics: &Metrics) -> Result<SdkTracerProvider, TraceError> {
    let mut metadata = tonic::metadata::MetadataMap::new();
    for (name, value) in &settings.headers {
        let key = tonic::metadata::MetadataKey::from_bytes(name.as_bytes())
            .map_err(|_| TraceError::Header(name.clone()))?;
        let value = value
            .expose_secret()
            .parse()
            .map_err(|_| TraceError::Header(name.clone()))?;
        metadata.insert(key, value);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(settings.endpoint.clone())
        .with_timeout(settings.timeout)
        .with_metadata(metadata)
        .build()?;
    let dropped = &metrics.trace_spans_dropped_total;
    let admission = Arc::new(Admission {
        waiting: AtomicUsize::new(0),
        capacity: settings.max_queue_size,
        queue_full: dropped.with_label_values(&["queue_full"]),
        export_failed: dropped.with_label_values(&["export_failed"]),
    });
    let batch = BatchSpanProcessor::builder(Counted {
        inner: exporter,
        admission: admission.clone(),
    })
    .with_batch_config(
        BatchConfigBuilder::default()
            .with_max_queue_size(settings.max_queue_size)
            .with_scheduled_delay(settings.batch_delay)
            .build(),
    )
    .build();
    let resource = opentelemetry_sdk::Resource::builder_empty()
        .with_service_name(settings.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(Gate {
            inner: batch,
            admission,
        })
        .with_sampler(Sampler::AlwaysOn)
        .with_resource(resource)
        .build())
}

// === impl Gate ===

/// How many finished spans wait for the exporter, and what was dropped.
#[derive(Debug)]
struct Admission {
    /// Spans handed to the batch processor and not yet to the exporter.
    waiting: AtomicUsize,
    /// The batch processor's queue size: `waiting` never exceeds it, so
    /// that processor never drops a span we could not count.
    capacity: usize,
    queue_full: IntCounter,
    export_failed: IntCounter,
}

/// In front of the batch processor: drops idle ticks, and counts what
/// the queue has no room for.
#[derive(Debug)]
struct Gate<P> {
    inner: P,
    admission: Arc<Admission>,
}

/// A tick span that records nothing: `idle = true` and no events.
fn idle_tick(span: &SpanData) -> bool {
    span.name == "tick"
        && span.events.events.is_empty()
        && span
            .attributes
            .iter()
            .any(|kv| kv.key.as_str() == "idle" && kv.value == Value::Bool(true))
}

impl<P: SpanProcessor> SpanProcessor for Gate<P> {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if idle_tick(&span) {
            return;
        }
        let a = &self.admission;
        if a.waiting.fetch_add(1, Ordering::AcqRel) >= a.capacity {
            a.waiting.fetch_sub(1, Ordering::AcqRel);
            a.queue_full.inc();
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// The exporter, releasing the gate's room as batches leave the queue and
/// counting the spans of failed exports.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    admission: Arc<Admission>,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let n = batch.len();
        self.admission.waiting.fetch_sub(n, Ordering::AcqRel);
        let failed = self.admission.export_failed.clone();
        let export = self.inner.export(batch);
        async move {
            let r = export.await;
            if r.is_err() {
                failed.inc_by(n as u64);
            }
            r
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

// === impl WithTraceIds ===

/// A JSON event format that adds `trace_id` and `span_id` (lowercase hex,
/// as OTLP/JSON and the W3C header write them) of the innermost exported
/// span the event is in. Left out when the line already has such a key
/// (an event field of that name), so keys stay unique.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        if let Some((trace_id, span_id)) = trace_ids(ctx)
            && !line.contains("\"trace_id\":")
            && !line.contains("\"span_id\":")
        {
            let end = line.trim_end().len();
            if line[..end].ends_with('}') {
                line.insert_str(
                    end - 1,
                    &format!(",\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\""),
                );
            }
        }
        writer.write_str(&line)
    }
}

/// (trace id, span id) of the innermost span around the event that the
/// OpenTelemetry layer tracks.
fn trace_ids<S, N>(ctx: &FmtContext<'_, S, N>) -> Option<(String, String)>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    let scope = ctx.event_scope()?;
    let dispatch = tracing::dispatcher::get_default(Clone::clone);
    scope.into_iter().find_map(|span| {
        let cx = tracing_opentelemetry::get_otel_context(&span.id(), &dispatch)?;
        let sc = cx.span().span_context().clone();
        sc.is_valid()
            .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{
        SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use std::borrow::Cow;
    use std::sync::Mutex;

    fn span(name: &'static str, attributes: Vec<KeyValue>) -> SpanData {
        SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes([1; 16]),
                SpanId::from_bytes([2; 8]),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: Cow::Borrowed(name),
            start_time: std::time::UNIX_EPOCH,
            end_time: std::time::UNIX_EPOCH,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        }
    }

    #[derive(Debug, Default)]
    struct Sink(Mutex<Vec<String>>);

    impl SpanProcessor for Sink {
        fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}
        fn on_end(&self, span: SpanData) {
            self.0.lock().unwrap().push(span.name.to_string());
        }
        fn force_flush(&self) -> OTelSdkResult {
            Ok(())
        }
        fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
            Ok(())
        }
    }

    fn gate(capacity: usize, metrics: &Metrics) -> Gate<Sink> {
        let dropped = &metrics.trace_spans_dropped_total;
        Gate {
            inner: Sink::default(),
            admission: Arc::new(Admission {
                waiting: AtomicUsize::new(0),
                capacity,
                queue_full: dropped.with_label_values(&["queue_full"]),
                export_failed: dropped.with_label_values(&["export_failed"]),
            }),
        }
    }

    #[test]
    fn idle_ticks_are_dropped_before_the_queue() {
        let metrics = Metrics::new();
        let g = gate(10, &metrics);
        g.on_end(span("tick", vec![KeyValue::new("idle", true)]));
        g.on_end(span("tick", vec![KeyValue::new("idle", false)]));
        g.on_end(span("incident", vec![KeyValue::new("idle", true)]));
        assert_eq!(*g.inner.0.lock().unwrap(), ["tick", "incident"]);
        assert_eq!(g.admission.waiting.load(Ordering::Relaxed), 2);
        assert_eq!(g.admission.queue_full.get(), 0);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let metrics = Metrics::new();
        let g = gate(2, &metrics);
        for _ in 0..5 {
            g.on_end(span("action", vec![]));
        }
        assert_eq!(g.inner.0.lock().unwrap().len(), 2);
        assert_eq!(g.admission.queue_full.get(), 3);
        assert!(
            metrics
                .render()
                .contains(r#"spire_healer_trace_spans_dropped_total{reason="queue_full"} 3"#)
        );
        // A batch leaving for the exporter makes room again.
        g.admission.waiting.fetch_sub(2, Ordering::AcqRel);
        g.on_end(span("action", vec![]));
        assert_eq!(g.inner.0.lock().unwrap().len(), 3);
    }

    #[derive(Debug)]
    struct Failing;

    impl SpanExporter for Failing {
        async fn export(&self, _: Vec<SpanData>) -> OTelSdkResult {
            Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                "unavailable".into(),
            ))
        }
    }

    #[tokio::test]
    async fn failed_exports_count_their_spans_and_free_the_queue() {
        let metrics = Metrics::new();
        let g = gate(10, &metrics);
        for _ in 0..3 {
            g.on_end(span("action", vec![]));
        }
        let exporter = Counted {
            inner: Failing,
            admission: g.admission.clone(),
        };
        let r = exporter
            .export(vec![span("a", vec![]), span("b", vec![])])
            .await;
        assert!(r.is_err());
        assert_eq!(g.admission.export_failed.get(), 2);
        assert_eq!(g.admission.waiting.load(Ordering::Relaxed), 1);
    }
}
