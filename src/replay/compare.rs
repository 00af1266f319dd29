//! The side-by-side: what the recorded store says was done (actions
//! started, holds) and what the replay decided, per incident (symptom and
//! subject) and time.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use serde::Serialize;

use super::{Replayed, Segment, SegmentStart};
use crate::clock::{from_unix_millis, unix_millis};
use crate::knowledge::{ActionRecord, HoldRecord, IncidentRecord, Query, Store, StoreError};

/// Rows per listing call.
pub const PAGE: u32 = 1000;

/// One decision: an action started (or that would have been) or a hold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// When (unix ms): the tick's time.
    pub at_ms: i64,
    /// The incident's symptom (`unknown` when the incident is not found).
    pub symptom: String,
    /// The incident's subject (its target when the incident is not found).
    pub subject: String,
    pub incident_id: String,
    #[serde(flatten)]
    pub kind: DecisionKind,
}

/// Acted or held.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum DecisionKind {
    /// A step started (recorded), or would have (replayed: always a dry
    /// run, with no outcome).
    Acted {
        actuator: String,
        /// Ladder rung.
        rung: i64,
        /// Recorded only: the live loop was in dry run.
        dry_run: bool,
        /// Recorded only: `ok`, `error`, `timeout`, `dry_run`.
        outcome: Option<String>,
        /// Recorded only: `verified`, `failed`, `skipped`.
        verification: Option<String>,
    },
    /// Held back, and why (a hold reason or a precondition's).
    Held { actuator: String, reason: String },
}

impl Decision {
    /// As the recorded column shows it.
    fn recorded(&self) -> String {
        match &self.kind {
            DecisionKind::Acted {
                actuator,
                rung,
                dry_run,
                outcome,
                verification,
            } => {
                let mut facts = vec![format!("rung {rung}")];
                facts.extend(outcome.clone());
                facts.extend(verification.clone());
                let verb = if *dry_run { "dry-ran" } else { "acted" };
                format!("{verb} {actuator} ({})", facts.join(", "))
            }
            DecisionKind::Held { actuator, reason } => format!("held {actuator}: {reason}"),
        }
    }

    /// As the replayed column shows it.
    fn replayed(&self) -> String {
        match &self.kind {
            DecisionKind::Acted { actuator, rung, .. } => {
                format!("would act {actuator} (rung {rung})")
            }
            DecisionKind::Held { actuator, reason } => {
                format!("would hold {actuator}: {reason}")
            }
        }
    }
}

/// One line of the side-by-side: one incident (symptom, subject) at one
/// time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub symptom: String,
    pub subject: String,
    /// Unix ms.
    pub at_ms: i64,
    /// RFC 3339.
    pub at: String,
    /// What was done then.
    pub recorded: Vec<Decision>,
    /// What the other policy would have done then.
    pub replayed: Vec<Decision>,
    /// A frame was replayed at this time; `false`: the replay saw nothing
    /// then (no frame recorded), so an empty `replayed` says nothing.
    pub replayed_frames: bool,
}

/// A replay's report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The policy replayed (as named on the command line).
    pub policy: String,
    pub since_ms: i64,
    pub until_ms: i64,
    /// RFC 3339.
    pub since: String,
    pub until: String,
    /// Frames replayed.
    pub frames: u64,
    /// Frames that could not be read.
    pub unreadable_frames: u64,
    /// Stretches replayed with one memory each.
    pub segments: Vec<Segment>,
    /// `false` when the recorded store returned only its newest decisions
    /// and older ones in the interval may be missing.
    pub recorded_complete: bool,
    pub rows: Vec<Row>,
}

impl Report {
    /// Sets the recorded decisions beside the replayed ones.
    pub fn new(
        policy: &str,
        since: SystemTime,
        until: SystemTime,
        replayed: Replayed,
        recorded: Vec<Decision>,
        recorded_complete: bool,
    ) -> Self {
        let rows = side_by_side(recorded, replayed.decisions, &replayed.segments);
        Self {
            policy: policy.to_string(),
            since_ms: unix_millis(since),
            until_ms: unix_millis(until),
            since: crate::clock::rfc3339(since),
            until: crate::clock::rfc3339(until),
            frames: replayed.segments.iter().map(|s| s.frames).sum(),
            unreadable_frames: replayed.unreadable,
            segments: replayed.segments,
            recorded_complete,
            rows,
        }
    }

    /// For people: the segments (each a fresh memory, and why), then one
    /// line per incident and time.
    pub fn table(&self) -> String {
        let mut out = format!(
            "Replay of {} .. {} under {}: {} frame(s) in {} segment(s).\n",
            self.since,
            self.until,
            self.policy,
            self.frames,
            self.segments.len()
        );
        for (i, s) in self.segments.iter().enumerate() {
            let why = match &s.start {
                SegmentStart::First => "the run's first frame in the interval".to_string(),
                SegmentStart::Gap {
                    missing_ticks,
                    after_ms,
                } => format!(
                    "memory reset: {missing_ticks} tick(s) not recorded after {}",
                    ms(*after_ms)
                ),
            };
            out.push_str(&format!(
                "  segment {} (run {}): {} .. {}, {} frame(s); starts empty: {why}\n",
                i + 1,
                s.run_id,
                ms(s.from_ms),
                ms(s.to_ms),
                s.frames
            ));
        }
        if self.unreadable_frames > 0 {
            out.push_str(&format!(
                "warning: {} frame(s) could not be read (a newer format?) and were skipped as gaps.\n",
                self.unreadable_frames
            ));
        }
        if !self.recorded_complete {
            out.push_str(
                "warning: the recorded store returned only its newest decisions; older ones in \
                 the interval may be missing from the RECORDED column.\n",
            );
        }
        if self.rows.is_empty() {
            out.push_str("No decision was recorded or replayed in this interval.\n");
            return out;
        }
        out.push('\n');
        let body: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                let replayed = if r.replayed.is_empty() && !r.replayed_frames {
                    "(no frames)".to_string()
                } else {
                    join(r.replayed.iter().map(Decision::replayed))
                };
                vec![
                    r.symptom.clone(),
                    r.subject.clone(),
                    r.at.clone(),
                    join(r.recorded.iter().map(Decision::recorded)),
                    replayed,
                ]
            })
            .collect();
        out.push_str(&crate::term::table(
            &["SYMPTOM", "SUBJECT", "TIME", "RECORDED", "REPLAYED"],
            &body,
        ));
        out
    }
}

/// RFC 3339 to the millisecond: ticks may come less than a second apart.
fn ms(at_ms: i64) -> String {
    humantime::format_rfc3339_millis(from_unix_millis(at_ms)).to_string()
}

fn join(parts: impl Iterator<Item = String>) -> String {
    parts.collect::<Vec<_>>().join("; ")
}

/// One row per (symptom, subject, time), grouped by incident, then by time.
pub fn side_by_side(
    recorded: Vec<Decision>,
    replayed: Vec<Decision>,
    segments: &[Segment],
) -> Vec<Row> {
    type Key = (String, String, i64);
    let mut by: BTreeMap<Key, (Vec<Decision>, Vec<Decision>)> = BTreeMap::new();
    for d in recorded {
        let key = (d.symptom.clone(), d.subject.clone(), d.at_ms);
        by.entry(key).or_default().0.push(d);
    }
    for d in replayed {
        let key = (d.symptom.clone(), d.subject.clone(), d.at_ms);
        by.entry(key).or_default().1.push(d);
    }
    by.into_iter()
        .map(|((symptom, subject, at_ms), (recorded, replayed))| Row {
            symptom,
            subject,
            at_ms,
            at: ms(at_ms),
            recorded,
            replayed,
            replayed_frames: segments
                .iter()
                .any(|s| (s.from_ms..=s.to_ms).contains(&at_ms)),
        })
        .collect()
}

/// Everything a scratch store holds, as decisions.
///
/// # Errors
/// The store's.
pub async fn replayed_decisions(store: &dyn Store) -> Result<Vec<Decision>, StoreError> {
    let all = Query {
        limit: u32::MAX,
        ..Query::default()
    };
    let incidents = store.incidents(&all).await?;
    let actions = store.actions(&all).await?;
    let holds = store.holds(&all).await?;
    let by_id: HashMap<&str, &IncidentRecord> =
        incidents.iter().map(|i| (i.id.as_str(), i)).collect();
    Ok(decisions(&actions, &holds, |id| by_id.get(id).copied()))
}

/// What the recorded store says was done in `[since_ms, until_ms)`, and
/// whether that is complete: `false` when the store returned only its
/// newest rows (a store that ignores the query's time range), so older
/// ones in the interval may be missing.
///
/// # Errors
/// The store's, except that a store without incident lookups is read
/// through its incident listing instead.
pub async fn recorded_decisions(
    store: &dyn Store,
    since_ms: i64,
    until_ms: i64,
) -> Result<(Vec<Decision>, bool), StoreError> {
    let (actions, complete_a) = listing(
        |q| async move { store.actions(&q).await },
        |a: &ActionRecord| a.started_at_ms,
        since_ms,
        until_ms,
    )
    .await?;
    let (holds, complete_h) = listing(
        |q| async move { store.holds(&q).await },
        |h: &HoldRecord| h.at_ms,
        since_ms,
        until_ms,
    )
    .await?;
    let mut ids: Vec<&str> = actions
        .iter()
        .map(|a| a.incident_id.as_str())
        .chain(holds.iter().map(|h| h.incident_id.as_str()))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let mut incidents: HashMap<String, IncidentRecord> = HashMap::new();
    let mut lookups = true;
    for id in ids {
        if !lookups {
            break;
        }
        match store.incident(id).await {
            Ok(Some(i)) => {
                incidents.insert(i.id.clone(), i);
            }
            Ok(None) => {}
            // A store without single lookups: its newest incidents.
            Err(StoreError::Corrupt(_)) => lookups = false,
            Err(e) => return Err(e),
        }
    }
    if !lookups {
        let newest = store
            .incidents(&Query {
                limit: 10 * PAGE,
                ..Query::default()
            })
            .await?;
        incidents.extend(newest.into_iter().map(|i| (i.id.clone(), i)));
    }
    let d = decisions(&actions, &holds, |id| incidents.get(id));
    Ok((d, complete_a && complete_h))
}

/// Actions and holds as decisions, in time order; `incident` finds the
/// incident a row serves.
fn decisions<'i>(
    actions: &[ActionRecord],
    holds: &[HoldRecord],
    incident: impl Fn(&str) -> Option<&'i IncidentRecord>,
) -> Vec<Decision> {
    let about = |id: &str, target: &str, symptom: Option<&str>| match incident(id) {
        Some(i) => (i.symptom.clone(), i.subject.clone()),
        None => (symptom.unwrap_or("unknown").to_string(), target.to_string()),
    };
    let mut out: Vec<Decision> = actions
        .iter()
        .map(|a| {
            let (symptom, subject) = about(&a.incident_id, &a.target, Some(&a.symptom));
            Decision {
                at_ms: a.started_at_ms,
                symptom,
                subject,
                incident_id: a.incident_id.clone(),
                kind: DecisionKind::Acted {
                    actuator: a.actuator.clone(),
                    rung: a.rung,
                    dry_run: a.dry_run,
                    outcome: a.outcome.clone(),
                    verification: a.verification.clone(),
                },
            }
        })
        .chain(holds.iter().map(|h| {
            let (symptom, subject) = about(&h.incident_id, &h.target, None);
            Decision {
                at_ms: h.at_ms,
                symptom,
                subject,
                incident_id: h.incident_id.clone(),
                kind: DecisionKind::Held {
                    actuator: h.actuator.clone(),
                    reason: h.reason.clone(),
                },
            }
        }))
        .collect();
    out.sort_by(|a, b| (a.at_ms, &a.subject).cmp(&(b.at_ms, &b.subject)));
    out
}

/// Every row of a listing in `[since_ms, until_ms)` by its time column
/// `at`, in newest-first pages of [`PAGE`]. Works whether or not the store
/// applies the query's time range: rows outside it are filtered here.
/// Returns the rows and whether they are complete (`false`: the store
/// returned only its newest rows, and older ones in range may be missing).
async fn listing<T, F, Fut>(
    fetch: F,
    at: impl Fn(&T) -> i64,
    since_ms: i64,
    until_ms: i64,
) -> Result<(Vec<T>, bool), StoreError>
where
    F: Fn(Query) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<T>, StoreError>>,
{
    let mut out = Vec::new();
    let mut upper = until_ms;
    loop {
        let rows = fetch(Query {
            limit: PAGE,
            since_ms: Some(since_ms),
            until_ms: Some(upper),
            ..Query::default()
        })
        .await?;
        let full = rows.len() >= PAGE as usize;
        let in_range = |r: &T| (since_ms..upper).contains(&at(r));
        if !rows.iter().all(in_range) {
            // The store ignores the range: these are its newest rows.
            let reached_since = rows.last().is_some_and(|r| at(r) < since_ms);
            out.extend(rows.into_iter().filter(|r| in_range(r)));
            return Ok((out, !full || reached_since));
        }
        let (Some(newest), Some(oldest)) = (rows.first().map(&at), rows.last().map(&at)) else {
            return Ok((out, true));
        };
        if !full {
            out.extend(rows);
            return Ok((out, true));
        }
        if newest == oldest {
            // A whole page within one millisecond: cannot page by time.
            out.extend(rows);
            return Ok((out, false));
        }
        // The oldest millisecond may be cut short: it is read again, whole.
        out.extend(rows.into_iter().filter(|r| at(r) > oldest));
        upper = oldest + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(at: i64) -> i64 {
        at
    }

    /// A store honouring the range, newest first.
    async fn honouring(rows: &[i64], q: Query) -> Result<Vec<i64>, StoreError> {
        let mut r: Vec<i64> = rows
            .iter()
            .copied()
            .filter(|t| q.since_ms.is_none_or(|s| *t >= s) && q.until_ms.is_none_or(|u| *t < u))
            .collect();
        r.sort_unstable_by(|a, b| b.cmp(a));
        r.truncate(q.limit as usize);
        Ok(r)
    }

    /// A store ignoring it: its newest rows.
    async fn ignoring(rows: &[i64], q: Query) -> Result<Vec<i64>, StoreError> {
        let mut r = rows.to_vec();
        r.sort_unstable_by(|a, b| b.cmp(a));
        r.truncate(q.limit as usize);
        Ok(r)
    }

    #[tokio::test]
    async fn listings_page_by_time_and_survive_stores_without_ranges() {
        // 2,500 rows, several per millisecond, across page boundaries.
        let rows: Vec<i64> = (0..2_500).map(|i| 10_000 + i / 3).collect();
        let want = |since: i64, until: i64| {
            let mut w: Vec<i64> = rows
                .iter()
                .copied()
                .filter(|t| (since..until).contains(t))
                .collect();
            w.sort_unstable_by(|a, b| b.cmp(a));
            w
        };
        let (got, complete) = listing(|q| honouring(&rows, q), |r| row(*r), 10_100, 10_800)
            .await
            .unwrap();
        assert!(complete);
        assert_eq!(got, want(10_100, 10_800));

        // Ignored range, but everything in it is among the newest rows.
        let (got, complete) = listing(|q| ignoring(&rows, q), |r| row(*r), 10_600, 10_700)
            .await
            .unwrap();
        assert!(complete);
        assert_eq!(got, want(10_600, 10_700));
        // Ignored range reaching further back than one page: incomplete.
        let (got, complete) = listing(|q| ignoring(&rows, q), |r| row(*r), 10_000, 10_900)
            .await
            .unwrap();
        assert!(!complete);
        assert!(got.len() < want(10_000, 10_900).len());
    }

    fn decision(at_ms: i64, subject: &str, kind: DecisionKind) -> Decision {
        Decision {
            at_ms,
            symptom: "svid_rotation_overdue".into(),
            subject: subject.into(),
            incident_id: "i".into(),
            kind,
        }
    }

    fn acted(actuator: &str, rung: i64) -> DecisionKind {
        DecisionKind::Acted {
            actuator: actuator.into(),
            rung,
            dry_run: false,
            outcome: Some("ok".into()),
            verification: Some("failed".into()),
        }
    }

    #[test]
    fn rows_pair_decisions_of_one_incident_at_one_time() {
        let seg = Segment {
            run_id: "r".into(),
            from_ms: 1_000,
            to_ms: 5_000,
            frames: 5,
            start: SegmentStart::First,
        };
        let recorded = vec![
            decision(1_000, "svid:a/x", acted("refetch", 0)),
            decision(
                2_000,
                "svid:a/x",
                DecisionKind::Held {
                    actuator: "restart-agent".into(),
                    reason: "cooldown".into(),
                },
            ),
            decision(9_000, "svid:a/x", acted("restart-agent", 1)),
        ];
        let replayed = vec![decision(1_000, "svid:a/x", acted("restart-agent", 0))];
        let rows = side_by_side(recorded, replayed, std::slice::from_ref(&seg));
        assert_eq!(rows.len(), 3);
        assert_eq!(
            rows[0].recorded[0].recorded(),
            "acted refetch (rung 0, ok, failed)"
        );
        assert_eq!(
            rows[0].replayed[0].replayed(),
            "would act restart-agent (rung 0)"
        );
        assert!(rows[1].replayed.is_empty() && rows[1].replayed_frames);
        assert!(!rows[2].replayed_frames);

        let report = Report {
            policy: "other.toml".into(),
            since_ms: 0,
            until_ms: 10_000,
            since: ms(0),
            until: ms(10_000),
            frames: 5,
            unreadable_frames: 0,
            segments: vec![
                seg,
                Segment {
                    run_id: "r".into(),
                    from_ms: 7_000,
                    to_ms: 8_000,
                    frames: 2,
                    start: SegmentStart::Gap {
                        missing_ticks: 3,
                        after_ms: 5_000,
                    },
                },
            ],
            recorded_complete: true,
            rows,
        };
        let text = report.table();
        assert!(
            text.contains("memory reset: 3 tick(s) not recorded after"),
            "{text}"
        );
        let held = text
            .lines()
            .find(|l| l.contains("held restart-agent: cooldown"))
            .unwrap();
        assert!(!held.contains("(no frames)"), "{text}");
        let late = text
            .lines()
            .find(|l| l.contains("acted restart-agent"))
            .unwrap();
        assert!(late.trim_end().ends_with("(no frames)"), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["rows"][0]["recorded"][0]["decision"], "acted");
        assert_eq!(json["rows"][0]["replayed"][0]["actuator"], "restart-agent");
        assert_eq!(json["segments"][1]["start"]["kind"], "gap");
    }
}
