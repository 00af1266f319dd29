//! Fuzzes `ReportHandshakes` batches: any bytes that decode as a
//! `ReportHandshakesRequest` must fold into per-target counts without
//! panicking, and the tally must account for every report exactly once.
//!
//! Run: `cargo +nightly fuzz run report_batch fuzz/corpus/report_batch`

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use spire_healer::api::reports::{RejectKind, reason_from_proto, tally};
use spire_healer::handshake::{MAX_TARGET_LEN, Reason};
use spire_healer::proto::healer::ReportHandshakesRequest;

/// A small bound, so the count rule is exercised.
const MAX_COUNT: u64 = 1_000;

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = ReportHandshakesRequest::decode(data) else {
        return;
    };
    let t = tally(&batch.reports, MAX_COUNT);
    assert_eq!(
        t.kept_reports() + t.rejected_reports(),
        batch.reports.len() as u64,
        "every report is kept or rejected"
    );
    // Rules applied at batch or counter level never come out of `tally`.
    for k in [
        RejectKind::TooManyTargets,
        RejectKind::BatchTooLarge,
        RejectKind::StreamTooLong,
    ] {
        assert_eq!(t.rejected[k.index()], 0);
    }
    let mut seen = std::collections::HashSet::new();
    for g in &t.targets {
        assert!(!g.target.is_empty() && g.target.len() <= MAX_TARGET_LEN);
        assert!(seen.insert(g.target), "one entry per target");
        assert!(g.reports > 0);
        // Recompute from the raw reports.
        let mut want = [0u64; Reason::COUNT];
        let mut reports = 0;
        for r in batch.reports.iter().filter(|r| r.target == g.target) {
            let n = r.count.max(1);
            if let Ok(reason) = reason_from_proto(r.reason)
                && n <= MAX_COUNT
            {
                want[reason.index()] = want[reason.index()].saturating_add(n);
                reports += 1;
            }
        }
        assert_eq!(g.counts.by_reason, want);
        assert_eq!(g.reports, reports);
    }
});
