//! The listing queries, shared by both backends: which filter each listing
//! takes, and newest-first paging by (time column, id).
//!
//! Each function returns the SQL after a backend's `SELECT … FROM table`
//! and the values to bind. The SQL is built from constants and numbered
//! placeholders (`$1`, which both backends take) only; values are always
//! bound. Every shape of filter plus `ORDER BY time DESC, id DESC` is a
//! range of one index (see `migrations/*/0003_operator_controls.sql`).
//!
//! The start-up reads of the operator controls are here too, the same SQL
//! on both backends.

use super::{PageKey, Query, StoreError};

/// One value to bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Arg {
    Int(i64),
    Text(String),
}

/// A listing: the SQL after `SELECT … FROM table ` and its values.
#[derive(Debug)]
pub(super) struct Listing {
    pub sql: String,
    pub args: Vec<Arg>,
}

/// Incidents: `open_only`, `symptom`.
pub(super) fn incidents(q: &Query) -> Result<Listing, StoreError> {
    let mut w = Where::default();
    if q.open_only {
        w.raw("closed_at_ms IS NULL");
    }
    if let Some(symptom) = &q.symptom {
        w.eq("symptom", symptom);
    }
    w.finish(q, "opened_at_ms", Id::Text)
}

/// Actions: `incident_id`.
pub(super) fn actions(q: &Query) -> Result<Listing, StoreError> {
    let mut w = Where::default();
    if let Some(id) = &q.incident_id {
        w.eq("incident_id", id);
    }
    w.finish(q, "started_at_ms", Id::Text)
}

/// Holds: `incident_id`; the id is the integer row id.
pub(super) fn holds(q: &Query) -> Result<Listing, StoreError> {
    let mut w = Where::default();
    if let Some(id) = &q.incident_id {
        w.eq("incident_id", id);
    }
    w.finish(q, "at_ms", Id::Int)
}

/// Approvals: `open_only` (pending), `incident_id`, `id`.
pub(super) fn approvals(q: &Query) -> Result<Listing, StoreError> {
    let mut w = Where::default();
    if q.open_only {
        w.raw("state = 'pending'");
    }
    if let Some(id) = &q.incident_id {
        w.eq("incident_id", id);
    }
    if let Some(id) = &q.id {
        w.eq("id", id);
    }
    w.finish(q, "requested_at_ms", Id::Text)
}

/// Audit: `incident_id`, `kinds`.
pub(super) fn audit(q: &Query) -> Result<Listing, StoreError> {
    let mut w = Where::default();
    if let Some(id) = &q.incident_id {
        w.eq("incident_id", id);
    }
    if !q.kinds.is_empty() {
        w.one_of("kind", &q.kinds);
    }
    w.finish(q, "at_ms", Id::Text)
}

// === Start-up reads ===

/// The controls [`Knowledge::controls`](super::Knowledge::controls) lists,
/// in its order.
pub(super) const CONTROLS: [&str; 2] = ["pause", "dry_run"];

/// The change in force of control `$1`: the last one applied.
pub(super) const LAST_CONTROL_CHANGE: &str = "SELECT change, changed_by, reason, at_ms \
     FROM control_changes WHERE control = $1 ORDER BY seq DESC LIMIT 1";

/// Every column of `approvals`, for listings and the start.
pub(super) const APPROVAL_SELECT: &str = "SELECT id, incident_id, symptom, rung, actuator, \
     target, state, requested_at_ms, expires_at_ms, decided_by, decided_at_ms, reason, \
     action_id FROM approvals ";

/// Approvals still live (pending or approved), oldest request first. Few:
/// the loop concludes each one (used, expired or withdrawn).
pub(super) const LIVE_APPROVALS: &str = "SELECT id, incident_id, symptom, rung, actuator, \
     target, state, requested_at_ms, expires_at_ms, decided_by, decided_at_ms, reason, \
     action_id FROM approvals WHERE state IN ('pending', 'approved') \
     ORDER BY requested_at_ms, id";

/// Demotions not reset, oldest first. Few: at most one per pair.
pub(super) const OPEN_DEMOTIONS: &str = "SELECT symptom, actuator, verified, runs, \
     demoted_at_ms FROM demotions WHERE reset_at_ms IS NULL \
     ORDER BY demoted_at_ms, symptom, actuator";

/// The first (symptom, actuator) with a verdict. With
/// [`NEXT_VERDICT_PAIR`], a skip through `actions_verdicts`: one index
/// seek per pair, however many actions there are.
pub(super) const FIRST_VERDICT_PAIR: &str = "SELECT symptom, actuator FROM actions \
     WHERE verification IN ('verified', 'failed') ORDER BY symptom, actuator LIMIT 1";

/// The next (symptom, actuator) with a verdict after ($1, $2).
pub(super) const NEXT_VERDICT_PAIR: &str = "SELECT symptom, actuator FROM actions \
     WHERE verification IN ('verified', 'failed') AND (symptom, actuator) > ($1, $2) \
     ORDER BY symptom, actuator LIMIT 1";

/// The last `$4` verdicts of pair ($1, $2) judged at or after its last
/// demotion reset (`$3`: the lowest time, when never reset), newest first.
pub(super) const VERDICT_WINDOW_OF_PAIR: &str = "SELECT verification, verified_at_ms \
     FROM actions WHERE verification IN ('verified', 'failed') \
     AND symptom = $1 AND actuator = $2 \
     AND verified_at_ms >= COALESCE((SELECT max(reset_at_ms) FROM demotions \
       WHERE symptom = $1 AND actuator = $2), $3) \
     ORDER BY verified_at_ms DESC, id DESC LIMIT $4";

/// Listing limit: 0 means the default of 100.
pub(super) fn limit(q: &Query) -> i64 {
    if q.limit == 0 {
        100
    } else {
        i64::from(q.limit)
    }
}

/// The type of a table's `id`.
#[derive(Debug, Clone, Copy)]
enum Id {
    Text,
    Int,
}

/// Conditions joined by `AND`, with their values.
#[derive(Default)]
struct Where {
    conditions: Vec<String>,
    args: Vec<Arg>,
}

impl Where {
    /// Binds `arg`; returns its placeholder.
    fn bind(&mut self, arg: Arg) -> String {
        self.args.push(arg);
        format!("${}", self.args.len())
    }

    fn raw(&mut self, condition: &'static str) {
        self.conditions.push(condition.to_owned());
    }

    fn eq(&mut self, column: &'static str, value: &str) {
        let p = self.bind(Arg::Text(value.to_owned()));
        self.conditions.push(format!("{column} = {p}"));
    }

    fn one_of(&mut self, column: &'static str, values: &[String]) {
        let ps: Vec<String> = values
            .iter()
            .map(|v| self.bind(Arg::Text(v.clone())))
            .collect();
        self.conditions
            .push(format!("{column} IN ({})", ps.join(", ")));
    }

    /// Adds the time range and the page, then orders and limits.
    fn finish(mut self, q: &Query, time: &'static str, id: Id) -> Result<Listing, StoreError> {
        if let Some(since) = q.since_ms {
            let p = self.bind(Arg::Int(since));
            self.conditions.push(format!("{time} >= {p}"));
        }
        if let Some(until) = q.until_ms {
            let p = self.bind(Arg::Int(until));
            self.conditions.push(format!("{time} < {p}"));
        }
        if let Some(PageKey { at_ms, id: last }) = &q.page {
            let last = match id {
                Id::Text => Arg::Text(last.clone()),
                Id::Int => Arg::Int(last.parse().map_err(|_| {
                    StoreError::InvalidQuery(format!(
                        "page key id {last:?} is not a hold id (decimal digits)"
                    ))
                })?),
            };
            let t = self.bind(Arg::Int(*at_ms));
            let i = self.bind(last);
            // A row value: both backends search an index on (time, id)
            // with it, where the spelled-out OR would not.
            self.conditions.push(format!("({time}, id) < ({t}, {i})"));
        }
        let mut sql = String::new();
        if !self.conditions.is_empty() {
            sql.push_str("WHERE ");
            sql.push_str(&self.conditions.join(" AND "));
            sql.push(' ');
        }
        let p = self.bind(Arg::Int(limit(q)));
        sql.push_str(&format!("ORDER BY {time} DESC, id DESC LIMIT {p}"));
        Ok(Listing {
            sql,
            args: self.args,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_in_order_with_its_placeholders() {
        let q = Query {
            incident_id: Some("inc-1".into()),
            kinds: vec!["held".into(), "acted".into()],
            since_ms: Some(10),
            until_ms: Some(20),
            page: Some(PageKey {
                at_ms: 15,
                id: "b".into(),
            }),
            limit: 7,
            ..Query::default()
        };
        let l = audit(&q).unwrap();
        assert_eq!(
            l.sql,
            "WHERE incident_id = $1 AND kind IN ($2, $3) AND at_ms >= $4 AND at_ms < $5 \
             AND (at_ms, id) < ($6, $7) ORDER BY at_ms DESC, id DESC LIMIT $8"
        );
        assert_eq!(
            l.args,
            [
                Arg::Text("inc-1".into()),
                Arg::Text("held".into()),
                Arg::Text("acted".into()),
                Arg::Int(10),
                Arg::Int(20),
                Arg::Int(15),
                Arg::Text("b".into()),
                Arg::Int(7),
            ]
        );
    }

    #[test]
    fn no_filter_orders_and_limits_only() {
        let l = incidents(&Query::default()).unwrap();
        assert_eq!(l.sql, "ORDER BY opened_at_ms DESC, id DESC LIMIT $1");
        assert_eq!(l.args, [Arg::Int(100)]);
    }

    #[test]
    fn a_hold_page_key_must_be_a_row_id() {
        let page = |id: &str| Query {
            page: Some(PageKey {
                at_ms: 1,
                id: id.into(),
            }),
            ..Query::default()
        };
        let ok = holds(&page("42")).unwrap();
        assert_eq!(ok.args[1], Arg::Int(42));
        let err = holds(&page("acted:x")).unwrap_err();
        assert_eq!(err.kind(), "invalid_query");
        assert!(err.to_string().contains("acted:x"), "{err}");
        // Text ids take anything.
        assert!(actions(&page("acted:x")).is_ok());
    }
}
