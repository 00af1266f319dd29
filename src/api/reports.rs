//! `ReportHandshakes`: batches of handshake outcomes folded into the shared
//! [`Counter`].
//!
//! [`tally`] is pure (the fuzz target drives it): one decoded batch →
//! per-target [`Counts`] plus per-kind rejections. [`Ingest::apply`] adds a
//! tally to the counter under one lock and updates the metrics;
//! [`Ingest::run`] reads a stream of batches under the per-batch and
//! per-stream bounds.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, Streaming};

use crate::handshake::{Counter, Counts, MAX_TARGET_LEN, Reason, Refused, Source};
use crate::proto::healer::{HandshakeReason, HandshakeReport, ReportHandshakesRequest};
use crate::telemetry::metrics::Metrics;

/// Why reports were not counted: a closed set, the `kind` label of
/// `spire_healer_handshake_reports_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectKind {
    /// `reason` was `HANDSHAKE_REASON_UNSPECIFIED` (or not set).
    UnspecifiedReason,
    /// `reason` was a number this server does not know.
    UnknownReason,
    /// `target` was empty.
    EmptyTarget,
    /// `target` was longer than [`MAX_TARGET_LEN`] bytes.
    TargetTooLong,
    /// `count` was over `max_count_per_report`.
    CountTooLarge,
    /// The counter already tracks its maximum number of targets.
    TooManyTargets,
    /// The whole batch had more than `max_batch_reports` reports.
    BatchTooLarge,
    /// The batch would have taken the stream over `max_stream_reports`.
    StreamTooLong,
}

impl RejectKind {
    /// Number of kinds.
    pub const COUNT: usize = 8;

    /// Every kind, in index order.
    pub const ALL: [RejectKind; RejectKind::COUNT] = [
        RejectKind::UnspecifiedReason,
        RejectKind::UnknownReason,
        RejectKind::EmptyTarget,
        RejectKind::TargetTooLong,
        RejectKind::CountTooLarge,
        RejectKind::TooManyTargets,
        RejectKind::BatchTooLarge,
        RejectKind::StreamTooLong,
    ];

    /// Snake-case name (metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            RejectKind::UnspecifiedReason => "unspecified_reason",
            RejectKind::UnknownReason => "unknown_reason",
            RejectKind::EmptyTarget => "empty_target",
            RejectKind::TargetTooLong => "target_too_long",
            RejectKind::CountTooLarge => "count_too_large",
            RejectKind::TooManyTargets => "too_many_targets",
            RejectKind::BatchTooLarge => "batch_too_large",
            RejectKind::StreamTooLong => "stream_too_long",
        }
    }

    /// Position in [`ALL`](Self::ALL).
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The wire value of `reason`: `HANDSHAKE_REASON_<NAME>`, numbered
/// `reason.index() + 1` (0 is "unspecified").
pub fn reason_to_proto(reason: Reason) -> HandshakeReason {
    match reason {
        Reason::Ok => HandshakeReason::Ok,
        Reason::Expired => HandshakeReason::Expired,
        Reason::NotYetValid => HandshakeReason::NotYetValid,
        Reason::UnknownCa => HandshakeReason::UnknownCa,
        Reason::BadSpiffeId => HandshakeReason::BadSpiffeId,
        Reason::NoClientCert => HandshakeReason::NoClientCert,
        Reason::Refused => HandshakeReason::Refused,
        Reason::Timeout => HandshakeReason::Timeout,
        Reason::Protocol => HandshakeReason::Protocol,
    }
}

/// Inverse of [`reason_to_proto`] on the raw wire number (prost keeps
/// unknown enum numbers as they came).
///
/// # Errors
/// [`RejectKind::UnspecifiedReason`] for 0, [`RejectKind::UnknownReason`]
/// for a number outside the enum.
pub fn reason_from_proto(value: i32) -> Result<Reason, RejectKind> {
    match value {
        0 => Err(RejectKind::UnspecifiedReason),
        v => usize::try_from(v)
            .ok()
            .and_then(|v| Reason::ALL.get(v - 1).copied())
            .ok_or(RejectKind::UnknownReason),
    }
}

/// A report with `target`, `reason` and `count` (0 means 1 on the wire).
pub fn report(target: impl Into<String>, reason: Reason, count: u64) -> HandshakeReport {
    HandshakeReport {
        target: target.into(),
        reason: reason_to_proto(reason).into(),
        count,
        peer_spiffe_id: String::new(),
    }
}

/// One target's share of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetTally<'a> {
    /// Target name, borrowed from the batch; valid per [`tally`]'s rules.
    pub target: &'a str,
    /// Outcomes per reason, with [`Source::Report`] set.
    pub counts: Counts,
    /// Reports folded into `counts`.
    pub reports: u64,
}

/// One batch folded into per-target counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally<'a> {
    /// Valid reports grouped by target, in first-seen order.
    pub targets: Vec<TargetTally<'a>>,
    /// Invalid reports per [`RejectKind::index`].
    pub rejected: [u64; RejectKind::COUNT],
}

impl Tally<'_> {
    /// Reports kept (not rejected).
    pub fn kept_reports(&self) -> u64 {
        self.targets.iter().map(|t| t.reports).sum()
    }

    /// Reports rejected, all kinds.
    pub fn rejected_reports(&self) -> u64 {
        self.rejected.iter().sum()
    }
}

/// Folds one batch into per-target counts. Pure; never panics.
///
/// A report is rejected, first rule first, when its target is empty or
/// longer than [`MAX_TARGET_LEN`] bytes, its reason is unspecified or
/// unknown, or its count (0 meaning 1) is over `max_count_per_report`.
/// `peer_spiffe_id` is ignored. Counts saturate at `u64::MAX`.
pub fn tally(reports: &[HandshakeReport], max_count_per_report: u64) -> Tally<'_> {
    let mut out = Tally::default();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for r in reports {
        let checked = check(r, max_count_per_report);
        let (reason, n) = match checked {
            Ok(ok) => ok,
            Err(kind) => {
                out.rejected[kind.index()] += 1;
                continue;
            }
        };
        let i = match index.entry(r.target.as_str()) {
            Entry::Occupied(e) => *e.get(),
            Entry::Vacant(e) => {
                out.targets.push(TargetTally {
                    target: e.key(),
                    counts: Counts::default(),
                    reports: 0,
                });
                *e.insert(out.targets.len() - 1)
            }
        };
        let t = &mut out.targets[i];
        t.counts.add(reason, n, Source::Report);
        t.reports += 1;
    }
    out
}

fn check(r: &HandshakeReport, max_count: u64) -> Result<(Reason, u64), RejectKind> {
    if r.target.is_empty() {
        return Err(RejectKind::EmptyTarget);
    }
    if r.target.len() > MAX_TARGET_LEN {
        return Err(RejectKind::TargetTooLong);
    }
    let reason = reason_from_proto(r.reason)?;
    let n = r.count.max(1);
    if n > max_count {
        return Err(RejectKind::CountTooLarge);
    }
    Ok((reason, n))
}

/// What one batch did to the counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Reports counted.
    pub accepted: u64,
    /// Reports not counted, per [`RejectKind::index`].
    pub rejected: [u64; RejectKind::COUNT],
    /// Outcomes counted, per [`Reason::index`].
    pub outcomes: [u64; Reason::COUNT],
}

impl Applied {
    /// Reports not counted, all kinds.
    pub fn rejected_reports(&self) -> u64 {
        self.rejected.iter().sum()
    }
}

/// Limits applied to report streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most reports in one batch (request message).
    pub max_batch_reports: usize,
    /// Most reports in one stream, over all its batches.
    pub max_stream_reports: u64,
    /// Largest `count` in one report.
    pub max_count_per_report: u64,
    /// Longest wait for the next batch.
    pub idle_timeout: Duration,
}

/// Metric handles resolved once (label lookups off the hot path).
struct ReportMetrics {
    outcomes: [IntCounter; Reason::COUNT],
    rejected: [IntCounter; RejectKind::COUNT],
    /// Handshake service-level events: good (`ok`), bad (the rest).
    slo_good: IntCounter,
    slo_bad: IntCounter,
}

impl ReportMetrics {
    fn new(m: &Metrics) -> Self {
        Self {
            outcomes: Reason::ALL.map(|r| {
                m.handshakes_total
                    .with_label_values(&[Source::Report.as_str(), r.as_str()])
            }),
            rejected: RejectKind::ALL.map(|k| {
                m.handshake_reports_rejected_total
                    .with_label_values(&[k.as_str()])
            }),
            slo_good: m
                .slo_events_total
                .with_label_values(&[crate::slo::Sli::Handshake.as_str(), "good"]),
            slo_bad: m
                .slo_events_total
                .with_label_values(&[crate::slo::Sli::Handshake.as_str(), "bad"]),
        }
    }

    fn record(&self, applied: &Applied) {
        for ((c, n), r) in self.outcomes.iter().zip(applied.outcomes).zip(Reason::ALL) {
            if n > 0 {
                c.inc_by(n);
                if r == Reason::Ok {
                    self.slo_good.inc_by(n);
                } else {
                    self.slo_bad.inc_by(n);
                }
            }
        }
        self.reject(&applied.rejected);
    }

    fn reject(&self, rejected: &[u64; RejectKind::COUNT]) {
        for (c, n) in self.rejected.iter().zip(rejected) {
            if *n > 0 {
                c.inc_by(*n);
            }
        }
    }
}

/// Folds report streams into the shared counter. Cheap to share (`Arc`).
pub struct Ingest {
    counter: Counter,
    limits: Limits,
    metrics: ReportMetrics,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Totals of one stream so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamTotals {
    /// Reports counted.
    pub accepted: u64,
    /// Reports not counted (in batches that were read).
    pub rejected: u64,
}

impl Ingest {
    /// An ingest feeding `counter` and `metrics` under `limits`.
    pub fn new(counter: Counter, limits: Limits, metrics: &Metrics) -> Arc<Self> {
        Arc::new(Self {
            counter,
            limits,
            metrics: ReportMetrics::new(metrics),
        })
    }

    /// Adds one tally to the counter (one lock) and to the metrics.
    pub fn apply(&self, tally: &Tally<'_>) -> Applied {
        let refused = self
            .counter
            .add_counts_indexed(tally.targets.iter().map(|t| (t.target, t.counts)));
        let mut out = Applied {
            rejected: tally.rejected,
            ..Applied::default()
        };
        let mut refused = refused.into_iter().peekable();
        for (i, t) in tally.targets.iter().enumerate() {
            if let Some((_, why)) = refused.next_if(|(j, _)| *j == i) {
                let kind = match why {
                    Refused::TooManyTargets => RejectKind::TooManyTargets,
                    // `tally` already refused these; kept for exhaustiveness.
                    Refused::BadTarget if t.target.is_empty() => RejectKind::EmptyTarget,
                    Refused::BadTarget => RejectKind::TargetTooLong,
                };
                out.rejected[kind.index()] += t.reports;
                continue;
            }
            out.accepted += t.reports;
            for (o, n) in out.outcomes.iter_mut().zip(t.counts.by_reason) {
                *o = o.saturating_add(n);
            }
        }
        self.metrics.record(&out);
        out
    }

    /// Reads batches until the client closes its side, then returns the
    /// totals. Each batch is applied as soon as it is read, so an error
    /// later in the stream keeps what came before.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` for a batch over `max_batch_reports`, a stream
    /// over `max_stream_reports` or a message over the size bound;
    /// `INVALID_ARGUMENT` for a message that does not decode;
    /// `DEADLINE_EXCEEDED` after `idle_timeout` without a batch;
    /// `UNAVAILABLE` on shutdown; the transport's status otherwise.
    ///
    /// # Cancel safety
    /// Cancel-safe: batches are applied whole or not at all.
    pub async fn run(
        &self,
        mut stream: Streaming<ReportHandshakesRequest>,
        shutdown: &CancellationToken,
    ) -> Result<StreamTotals, Status> {
        let mut totals = StreamTotals::default();
        let mut seen: u64 = 0;
        loop {
            let next = tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    return Err(ended(Code::Unavailable, "the server is shutting down", totals));
                }
                next = tokio::time::timeout(self.limits.idle_timeout, stream.message()) => next,
            };
            let batch = match next {
                Ok(Ok(Some(batch))) => batch,
                Ok(Ok(None)) => return Ok(totals),
                Ok(Err(status)) => return Err(stream_error(status, totals)),
                Err(_elapsed) => {
                    return Err(ended(
                        Code::DeadlineExceeded,
                        "no batch within the idle timeout",
                        totals,
                    ));
                }
            };
            let n = batch.reports.len();
            if n > self.limits.max_batch_reports {
                self.reject_batch(RejectKind::BatchTooLarge, n);
                let why = format!(
                    "a batch of {n} reports is over the limit of {}",
                    self.limits.max_batch_reports
                );
                return Err(ended(Code::ResourceExhausted, &why, totals));
            }
            seen = seen.saturating_add(n as u64);
            if seen > self.limits.max_stream_reports {
                self.reject_batch(RejectKind::StreamTooLong, n);
                let why = format!(
                    "the stream is over its limit of {} reports",
                    self.limits.max_stream_reports
                );
                return Err(ended(Code::ResourceExhausted, &why, totals));
            }
            let applied = self.apply(&tally(&batch.reports, self.limits.max_count_per_report));
            totals.accepted += applied.accepted;
            totals.rejected += applied.rejected_reports();
        }
    }

    fn reject_batch(&self, kind: RejectKind, reports: usize) {
        let mut rejected = [0; RejectKind::COUNT];
        rejected[kind.index()] = reports as u64;
        self.metrics.reject(&rejected);
    }
}

/// A stream ended early; the message says what was kept.
fn ended(code: Code, why: &str, totals: StreamTotals) -> Status {
    Status::new(
        code,
        format!(
            "{why}; {} reports accepted and {} rejected before it stay counted",
            totals.accepted, totals.rejected
        ),
    )
}

/// Maps an error reading the stream. tonic reports an oversized message as
/// `OUT_OF_RANGE` and a message prost cannot decode as `INTERNAL`; both are
/// the caller's doing here.
fn stream_error(status: Status, totals: StreamTotals) -> Status {
    match status.code() {
        Code::OutOfRange => ended(
            Code::ResourceExhausted,
            &format!("message too large: {}", status.message()),
            totals,
        ),
        Code::Internal => ended(
            Code::InvalidArgument,
            &format!("message does not decode: {}", status.message()),
            totals,
        ),
        _ => status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(target: &str, reason: i32, count: u64) -> HandshakeReport {
        HandshakeReport {
            target: target.to_string(),
            reason,
            count,
            peer_spiffe_id: String::new(),
        }
    }

    #[test]
    fn proto_reasons_follow_the_domain_order() {
        for r in Reason::ALL {
            let p = reason_to_proto(r);
            assert_eq!(i32::from(p), r.index() as i32 + 1);
            assert_eq!(
                p.as_str_name(),
                format!("HANDSHAKE_REASON_{}", r.as_str().to_uppercase())
            );
            assert_eq!(reason_from_proto(p.into()), Ok(r));
        }
        assert_eq!(reason_from_proto(0), Err(RejectKind::UnspecifiedReason));
        assert_eq!(reason_from_proto(10), Err(RejectKind::UnknownReason));
        assert_eq!(reason_from_proto(-1), Err(RejectKind::UnknownReason));
        assert_eq!(reason_from_proto(i32::MIN), Err(RejectKind::UnknownReason));
        assert_eq!(reason_from_proto(i32::MAX), Err(RejectKind::UnknownReason));
    }

    #[test]
    fn reject_kinds_are_indexed_in_order() {
        for (i, k) in RejectKind::ALL.into_iter().enumerate() {
            assert_eq!(k.index(), i);
        }
    }

    #[test]
    fn tally_groups_by_target_and_rejects_by_kind() {
        let long = "x".repeat(MAX_TARGET_LEN + 1);
        let edge = "y".repeat(MAX_TARGET_LEN);
        let batch = vec![
            report("db", Reason::Ok, 0),
            report("db", Reason::Ok, 4),
            report("db", Reason::UnknownCa, 2),
            report("web", Reason::Timeout, 1),
            report(edge.as_str(), Reason::Protocol, 100),
            raw("db", 0, 1),
            raw("db", 42, 1),
            raw("db", -3, 1),
            raw("", 1, 1),
            raw(&long, 1, 1),
            raw("db", 1, 101),
        ];
        let t = tally(&batch, 100);
        assert_eq!(t.targets.len(), 3);
        let db = t.targets[0];
        assert_eq!(db.target, "db");
        assert_eq!(db.reports, 3);
        assert_eq!(db.counts.get(Reason::Ok), 5, "count 0 means 1");
        assert_eq!(db.counts.get(Reason::UnknownCa), 2);
        assert_eq!(db.counts.source_names(), vec!["report"]);
        assert_eq!(t.targets[1].target, "web");
        assert_eq!(t.targets[2].counts.get(Reason::Protocol), 100);
        let r = |k: RejectKind| t.rejected[k.index()];
        assert_eq!(r(RejectKind::UnspecifiedReason), 1);
        assert_eq!(r(RejectKind::UnknownReason), 2);
        assert_eq!(r(RejectKind::EmptyTarget), 1);
        assert_eq!(r(RejectKind::TargetTooLong), 1);
        assert_eq!(r(RejectKind::CountTooLarge), 1);
        assert_eq!(t.kept_reports() + t.rejected_reports(), batch.len() as u64);
        assert_eq!(tally(&[], 1), Tally::default());
    }

    #[test]
    fn apply_counts_once_and_reports_refused_targets() {
        let counter = Counter::new(2);
        let metrics = Metrics::new();
        let ingest = Ingest::new(
            counter.clone(),
            Limits {
                max_batch_reports: 100,
                max_stream_reports: 1_000,
                max_count_per_report: 1_000,
                idle_timeout: Duration::from_secs(60),
            },
            &metrics,
        );
        let batch = vec![
            report("a", Reason::Ok, 3),
            report("b", Reason::Expired, 1),
            report("c", Reason::Ok, 7),
            report("c", Reason::Refused, 1),
            report("a", Reason::Ok, 1),
            raw("", 1, 1),
        ];
        let applied = ingest.apply(&tally(&batch, 1_000));
        assert_eq!(applied.accepted, 3);
        assert_eq!(applied.rejected[RejectKind::TooManyTargets.index()], 2);
        assert_eq!(applied.rejected[RejectKind::EmptyTarget.index()], 1);
        assert_eq!(applied.outcomes[Reason::Ok.index()], 4);
        assert_eq!(applied.outcomes[Reason::Expired.index()], 1);
        assert_eq!(applied.outcomes[Reason::Refused.index()], 0);
        let d = counter.drain();
        assert_eq!(d.len(), 2);
        assert_eq!(d.get("a").map(|a| a.get(Reason::Ok)), Some(4));
        let text = metrics.render();
        let sample = |s: &str| crate::telemetry::metrics::sample(&text, s);
        assert_eq!(
            sample(r#"spire_healer_handshakes_total{reason="ok",source="report"}"#),
            Some(4.0)
        );
        assert_eq!(
            sample(r#"spire_healer_handshake_reports_rejected_total{kind="too_many_targets"}"#),
            Some(2.0)
        );
        assert_eq!(
            sample(r#"spire_healer_handshake_reports_rejected_total{kind="empty_target"}"#),
            Some(1.0)
        );
        // Handshake service level: the accepted outcomes, good when ok.
        assert_eq!(
            sample(r#"spire_healer_slo_events_total{result="good",slo="handshake"}"#),
            Some(4.0)
        );
        assert_eq!(
            sample(r#"spire_healer_slo_events_total{result="bad",slo="handshake"}"#),
            Some(1.0)
        );
    }
}
