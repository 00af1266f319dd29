//! The `Supervisor` service: every RPC body, over a [`Backend`].
//!
//! Authorization has already happened when a handler runs ([`Authorized`]
//! put the caller's [`Principal`] in the request); handlers check the
//! request (sizes, names, paging), call the store or the controls, and map
//! the answer. Store failures are `UNAVAILABLE`; control refusals map to
//! codes in [`control_status`].
//!
//! [`Authorized`]: super::authz::Authorized

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use super::authz::Principal;
use super::convert::{self, Listing, Paged, Paging};
use super::watch::Watchers;
use super::{Backend, reports};
use crate::control::{ControlError, Resume};
use crate::knowledge::{
    ActionRecord, ApprovalRecord, AuditRecord, HoldRecord, IncidentRecord, Query, StoreError,
};
use crate::model::ApprovalState;
use crate::proto::healer::supervisor_server::Supervisor;
use crate::proto::healer::{self as pb, ReportHandshakesRequest, ReportHandshakesResponse};
use crate::telemetry::metrics::Metrics;

/// Most rows of each kind `GetIncident` returns (the newest ones).
const INCIDENT_DETAIL_ROWS: u32 = 1000;

/// The service behind both transports. Cheap to clone; clones share their
/// bounds (report streams, watchers).
#[derive(Clone)]
pub struct Api {
    pub(super) ingest: Arc<reports::Ingest>,
    pub(super) report_slots: Arc<Semaphore>,
    pub(super) backend: Backend,
    pub(super) watchers: Arc<Watchers>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) shutdown: CancellationToken,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").finish_non_exhaustive()
    }
}

/// The caller, as authorization admitted it.
///
/// # Errors
/// `UNAUTHENTICATED` when the request did not pass through
/// [`Authorized`](super::authz::Authorized) (never in a served API).
fn caller<T>(req: &Request<T>) -> Result<Principal, Status> {
    req.extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("caller credentials unknown"))
}

/// The one mapping from control refusals to status codes.
pub fn control_status(e: &ControlError) -> Status {
    let msg = e.to_string();
    match e {
        ControlError::UnknownApproval(_) | ControlError::NotDemoted { .. } => {
            Status::not_found(msg)
        }
        ControlError::AlreadyDecided { .. } | ControlError::Expired { .. } => {
            Status::failed_precondition(msg)
        }
        ControlError::Invalid(_) => Status::invalid_argument(msg),
    }
}

/// A store failure as the caller sees it.
fn store_status(what: &str, e: &StoreError) -> Status {
    if e.kind() == "invalid_query" {
        return Status::invalid_argument(e.to_string());
    }
    warn!(what, error = %e, "API store read failed.");
    Status::unavailable(format!(
        "the knowledge store could not be read ({what}): {e}"
    ))
}

impl Api {
    async fn report_handshakes(
        &self,
        req: Request<Streaming<ReportHandshakesRequest>>,
    ) -> Result<ReportHandshakesResponse, Status> {
        let _slot = self
            .report_slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("too many report streams open"))?;
        let totals = self.ingest.run(req.into_inner(), &self.shutdown).await?;
        Ok(ReportHandshakesResponse {
            accepted: totals.accepted,
            rejected: totals.rejected,
        })
    }

    fn get_status(&self) -> pb::GetStatusResponse {
        let status = self.backend.status.borrow().clone();
        let controls = &self.backend.controls;
        let pause = controls.paused();
        let pending = controls
            .live_approvals()
            .iter()
            .filter(|a| a.state == ApprovalState::Pending)
            .count();
        pb::GetStatusResponse {
            subjects: status
                .subjects
                .into_iter()
                .map(|s| pb::SubjectStatus {
                    subject: s.subject,
                    state: convert::subject_state(s.state).into(),
                    open_incident_ids: s.open_incident_ids,
                    predicted_outage_unix_ms: crate::control::ms(s.predicted_outage),
                })
                .collect(),
            healthy_subjects: status.healthy_subjects,
            blind_sensors: status.blind_sensors,
            paused: pause.is_some(),
            paused_by: pause.as_ref().map(|p| p.by.clone()).unwrap_or_default(),
            pause_reason: pause
                .as_ref()
                .and_then(|p| p.reason.clone())
                .unwrap_or_default(),
            paused_at_unix_ms: crate::control::ms(pause.map(|p| p.at)),
            dry_run: controls.dry_run(),
            leadership: match self.backend.leader_epoch {
                Some(_) => pb::Leadership::Leader,
                None => pb::Leadership::Sole,
            }
            .into(),
            leader_epoch: self.backend.leader_epoch.unwrap_or(0),
            pending_approvals: u32::try_from(pending).unwrap_or(u32::MAX),
            demoted: controls
                .demoted()
                .into_iter()
                .map(convert::demotion)
                .collect(),
            actions_in_flight: status.actions_in_flight,
            last_tick_unix_ms: crate::control::ms(status.last_tick),
            store_up: status.store_up,
            version: env!("CARGO_PKG_VERSION").to_string(),
            open_incidents: status.open_incidents,
        }
    }

    /// One page of `T`: `filter` narrowed to `paging`, read from the
    /// store, the extra row cut off. Returns the rows and the next page's
    /// token (empty on the last page).
    async fn page<T: Paged>(
        &self,
        paging: &Paging,
        filter: Query,
    ) -> Result<(Vec<T>, String), Status> {
        let q = convert::page_query(paging, filter);
        let mut rows = T::list(self.backend.store.as_ref(), &q)
            .await
            .map_err(|e| store_status(T::WHAT, &e))?;
        let next_page_token = convert::cut(T::LISTING, paging, &mut rows, T::key);
        Ok((rows, next_page_token))
    }

    async fn list_incidents(
        &self,
        r: pb::ListIncidentsRequest,
    ) -> Result<pb::ListIncidentsResponse, Status> {
        let paging = convert::paging(Listing::Incidents, r.page_size, &r.page_token)?;
        let (since_ms, until_ms) = convert::range(r.since_unix_ms, r.until_unix_ms)?;
        let symptom = if r.symptom.is_empty() {
            None
        } else {
            Some(
                convert::symptom("symptom", &r.symptom)?
                    .as_str()
                    .to_string(),
            )
        };
        let (rows, next_page_token) = self
            .page::<IncidentRecord>(
                &paging,
                Query {
                    open_only: r.open_only,
                    symptom,
                    since_ms,
                    until_ms,
                    ..Query::default()
                },
            )
            .await?;
        Ok(pb::ListIncidentsResponse {
            incidents: rows.into_iter().map(convert::incident).collect(),
            next_page_token,
        })
    }

    async fn get_incident(
        &self,
        r: pb::GetIncidentRequest,
    ) -> Result<pb::GetIncidentResponse, Status> {
        let id = convert::required_id("id", &r.id)?;
        let store = &self.backend.store;
        let incident = store
            .incident(id)
            .await
            .map_err(|e| store_status("incident", &e))?
            .ok_or_else(|| Status::not_found(format!("no incident {id}")))?;
        let q = Query {
            incident_id: Some(id.to_string()),
            limit: INCIDENT_DETAIL_ROWS,
            ..Query::default()
        };
        let (actions, holds, approvals, audit) = tokio::try_join!(
            async {
                store
                    .actions(&q)
                    .await
                    .map_err(|e| store_status("actions", &e))
            },
            async { store.holds(&q).await.map_err(|e| store_status("holds", &e)) },
            async {
                store
                    .approvals(&q)
                    .await
                    .map_err(|e| store_status("approvals", &e))
            },
            async { store.audit(&q).await.map_err(|e| store_status("audit", &e)) },
        )?;
        // The store lists newest first; an incident reads oldest first.
        Ok(pb::GetIncidentResponse {
            incident: Some(convert::incident(incident)),
            actions: actions.into_iter().rev().map(convert::action).collect(),
            holds: holds.into_iter().rev().map(convert::hold).collect(),
            approvals: approvals
                .into_iter()
                .rev()
                .map(|a| self.approval(a))
                .collect(),
            timeline: audit.into_iter().rev().map(convert::audit).collect(),
        })
    }

    /// A stored approval, with the state the controls hold when newer.
    fn approval(&self, r: ApprovalRecord) -> pb::Approval {
        let live = self.backend.controls.approval(&r.id);
        convert::approval(r, live)
    }

    async fn list_actions(
        &self,
        r: pb::ListActionsRequest,
    ) -> Result<pb::ListActionsResponse, Status> {
        let paging = convert::paging(Listing::Actions, r.page_size, &r.page_token)?;
        let (since_ms, until_ms) = convert::range(r.since_unix_ms, r.until_unix_ms)?;
        let (rows, next_page_token) = self
            .page::<ActionRecord>(
                &paging,
                Query {
                    incident_id: convert::optional_id("incident_id", &r.incident_id)?,
                    since_ms,
                    until_ms,
                    ..Query::default()
                },
            )
            .await?;
        Ok(pb::ListActionsResponse {
            actions: rows.into_iter().map(convert::action).collect(),
            next_page_token,
        })
    }

    async fn list_holds(&self, r: pb::ListHoldsRequest) -> Result<pb::ListHoldsResponse, Status> {
        let paging = convert::paging(Listing::Holds, r.page_size, &r.page_token)?;
        let (since_ms, until_ms) = convert::range(r.since_unix_ms, r.until_unix_ms)?;
        let (rows, next_page_token) = self
            .page::<HoldRecord>(
                &paging,
                Query {
                    incident_id: convert::optional_id("incident_id", &r.incident_id)?,
                    since_ms,
                    until_ms,
                    ..Query::default()
                },
            )
            .await?;
        Ok(pb::ListHoldsResponse {
            holds: rows.into_iter().map(convert::hold).collect(),
            next_page_token,
        })
    }

    async fn list_approvals(
        &self,
        r: pb::ListApprovalsRequest,
    ) -> Result<pb::ListApprovalsResponse, Status> {
        let paging = convert::paging(Listing::Approvals, r.page_size, &r.page_token)?;
        let (rows, next_page_token) = self
            .page::<ApprovalRecord>(
                &paging,
                Query {
                    open_only: r.pending_only,
                    incident_id: convert::optional_id("incident_id", &r.incident_id)?,
                    ..Query::default()
                },
            )
            .await?;
        let mut approvals: Vec<pb::Approval> = rows.into_iter().map(|a| self.approval(a)).collect();
        if r.pending_only {
            // Decided since the loop last recorded: no longer pending.
            approvals.retain(|a| a.state == i32::from(pb::ApprovalState::Pending));
        }
        Ok(pb::ListApprovalsResponse {
            approvals,
            next_page_token,
        })
    }

    async fn list_audit(&self, r: pb::ListAuditRequest) -> Result<pb::ListAuditResponse, Status> {
        let paging = convert::paging(Listing::Audit, r.page_size, &r.page_token)?;
        let (since_ms, until_ms) = convert::range(r.since_unix_ms, r.until_unix_ms)?;
        if r.kinds.len() > convert::MAX_KINDS {
            return Err(Status::invalid_argument(format!(
                "{} kinds given; the limit is {}",
                r.kinds.len(),
                convert::MAX_KINDS
            )));
        }
        if let Some(bad) = r
            .kinds
            .iter()
            .find(|k| !convert::AUDIT_KINDS.contains(&k.as_str()))
        {
            return Err(Status::invalid_argument(format!(
                "kind {:?} is not an audit kind; known: {}",
                bad.chars().take(convert::MAX_ID_BYTES).collect::<String>(),
                convert::AUDIT_KINDS.join(", ")
            )));
        }
        let (rows, next_page_token) = self
            .page::<AuditRecord>(
                &paging,
                Query {
                    incident_id: convert::optional_id("incident_id", &r.incident_id)?,
                    kinds: r.kinds,
                    since_ms,
                    until_ms,
                    ..Query::default()
                },
            )
            .await?;
        Ok(pb::ListAuditResponse {
            entries: rows.into_iter().map(convert::audit).collect(),
            next_page_token,
        })
    }

    /// Approves or rejects.
    async fn decide(
        &self,
        by: &Principal,
        id: &str,
        approve: bool,
        reason: String,
    ) -> Result<pb::Approval, Status> {
        let id = convert::required_id("approval_id", id)?;
        let field = if approve { "comment" } else { "reason" };
        let reason = convert::reason(field, reason)?;
        let now = self.backend.clock.now();
        match self
            .backend
            .controls
            .decide(id, approve, &by.to_string(), reason, now)
        {
            Ok(entry) => {
                info!(
                    approval = id,
                    by = %by,
                    state = entry.state.as_str(),
                    "Approval decided."
                );
                Ok(convert::approval_entry(entry))
            }
            Err(ControlError::UnknownApproval(_)) => Err(self.decided_before(id, now).await),
            Err(e) => Err(control_status(&e)),
        }
    }

    /// Why an approval the controls do not hold cannot be decided: what the
    /// store says about it, or `NOT_FOUND`.
    async fn decided_before(&self, id: &str, now: std::time::SystemTime) -> Status {
        let record = match self.find_approval(id).await {
            Ok(Some(r)) => r,
            Ok(None) => return control_status(&ControlError::UnknownApproval(id.to_string())),
            Err(e) => return store_status("approvals", &e),
        };
        let state = ApprovalState::parse(&record.state);
        let at = |ms: Option<i64>| {
            ms.map(|ms| crate::clock::rfc3339(crate::clock::from_unix_millis(ms)))
        };
        let e = match state {
            Some(ApprovalState::Pending)
                if crate::clock::from_unix_millis(record.expires_at_ms) <= now =>
            {
                ControlError::Expired {
                    id: id.to_string(),
                    at: at(Some(record.expires_at_ms)).unwrap_or_default(),
                }
            }
            Some(ApprovalState::Pending) => {
                // Pending in the store but not in this run's controls: the
                // loop has not taken it up (yet); nothing to decide here.
                return Status::failed_precondition(format!(
                    "approval {id} is pending in the store but not live in this run of \
                     spire-healer; retry after its next tick"
                ));
            }
            Some(state) => ControlError::AlreadyDecided {
                id: id.to_string(),
                state: state.as_str(),
                by: match (&record.decided_by, at(record.decided_at_ms)) {
                    (Some(who), Some(when)) => format!(" by {who} at {when}"),
                    (None, Some(when)) => format!(" since {when}"),
                    _ => String::new(),
                },
            },
            None => {
                return Status::failed_precondition(format!(
                    "approval {id} has an unknown stored state {:?}",
                    record.state
                ));
            }
        };
        control_status(&e)
    }

    /// Looks an approval up by id in the store. The controls hold every
    /// live approval and the last final ones, so this runs only for an id
    /// that is old, unknown, or from before a restart.
    async fn find_approval(&self, id: &str) -> Result<Option<ApprovalRecord>, StoreError> {
        let rows = self
            .backend
            .store
            .approvals(&Query {
                id: Some(id.to_string()),
                limit: 1,
                ..Query::default()
            })
            .await?;
        Ok(rows.into_iter().next())
    }

    fn control_response(&self, by: &Principal, changed: bool) -> pb::ControlResponse {
        pb::ControlResponse {
            paused: self.backend.controls.paused().is_some(),
            dry_run: self.backend.controls.dry_run(),
            changed,
            by: by.to_string(),
        }
    }

    fn watch(&self, cursor: &str) -> Result<super::watch::WatchStream, Status> {
        let hub = &self.backend.hub;
        let seq = if cursor.is_empty() {
            hub.newest()
        } else {
            if cursor.len() > convert::MAX_CURSOR_BYTES {
                return Err(Status::invalid_argument(format!(
                    "cursor is {} bytes; the limit is {}",
                    cursor.len(),
                    convert::MAX_CURSOR_BYTES
                )));
            }
            match hub.resume_from(cursor).map_err(|e| control_status(&e))? {
                Resume::After(seq) => seq,
                Resume::Gone => {
                    return Err(Status::out_of_range(format!(
                        "cursor {cursor} is older than the events this server still holds, \
                         or from another run: list, then watch from now"
                    )));
                }
            }
        };
        let slot = self.watchers.slot()?;
        Ok(self.watchers.start(
            hub.clone(),
            seq,
            slot,
            self.metrics.clone(),
            self.shutdown.clone(),
        ))
    }
}

#[tonic::async_trait]
impl Supervisor for Api {
    async fn report_handshakes(
        &self,
        req: Request<Streaming<ReportHandshakesRequest>>,
    ) -> Result<Response<ReportHandshakesResponse>, Status> {
        caller(&req)?;
        Api::report_handshakes(self, req).await.map(Response::new)
    }

    async fn get_status(
        &self,
        req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        caller(&req)?;
        Ok(Response::new(Api::get_status(self)))
    }

    async fn list_incidents(
        &self,
        req: Request<pb::ListIncidentsRequest>,
    ) -> Result<Response<pb::ListIncidentsResponse>, Status> {
        caller(&req)?;
        Api::list_incidents(self, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_incident(
        &self,
        req: Request<pb::GetIncidentRequest>,
    ) -> Result<Response<pb::GetIncidentResponse>, Status> {
        caller(&req)?;
        Api::get_incident(self, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_actions(
        &self,
        req: Request<pb::ListActionsRequest>,
    ) -> Result<Response<pb::ListActionsResponse>, Status> {
        caller(&req)?;
        Api::list_actions(self, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_holds(
        &self,
        req: Request<pb::ListHoldsRequest>,
    ) -> Result<Response<pb::ListHoldsResponse>, Status> {
        caller(&req)?;
        Api::list_holds(self, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_approvals(
        &self,
        req: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        caller(&req)?;
        Api::list_approvals(self, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_audit(
        &self,
        req: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        caller(&req)?;
        Api::list_audit(self, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn approve(
        &self,
        req: Request<pb::ApproveRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        let by = caller(&req)?;
        let r = req.into_inner();
        self.decide(&by, &r.approval_id, true, r.comment)
            .await
            .map(Response::new)
    }

    async fn reject(
        &self,
        req: Request<pb::RejectRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        let by = caller(&req)?;
        let r = req.into_inner();
        self.decide(&by, &r.approval_id, false, r.reason)
            .await
            .map(Response::new)
    }

    async fn pause(
        &self,
        req: Request<pb::PauseRequest>,
    ) -> Result<Response<pb::ControlResponse>, Status> {
        let by = caller(&req)?;
        let reason = convert::reason("reason", req.into_inner().reason)?;
        let changed =
            self.backend
                .controls
                .pause(&by.to_string(), reason, self.backend.clock.now());
        if changed {
            info!(by = %by, "Paused by an operator.");
        }
        Ok(Response::new(self.control_response(&by, changed)))
    }

    async fn resume(
        &self,
        req: Request<pb::ResumeRequest>,
    ) -> Result<Response<pb::ControlResponse>, Status> {
        let by = caller(&req)?;
        let reason = convert::reason("reason", req.into_inner().reason)?;
        let changed =
            self.backend
                .controls
                .resume_actions(&by.to_string(), reason, self.backend.clock.now());
        if changed {
            info!(by = %by, "Resumed by an operator.");
        }
        Ok(Response::new(self.control_response(&by, changed)))
    }

    async fn set_dry_run(
        &self,
        req: Request<pb::SetDryRunRequest>,
    ) -> Result<Response<pb::ControlResponse>, Status> {
        let by = caller(&req)?;
        let r = req.into_inner();
        let reason = convert::reason("reason", r.reason)?;
        let changed = self.backend.controls.set_dry_run(
            r.enabled,
            &by.to_string(),
            reason,
            self.backend.clock.now(),
        );
        if changed {
            info!(by = %by, dry_run = r.enabled, "Dry run set by an operator.");
        }
        Ok(Response::new(self.control_response(&by, changed)))
    }

    async fn reset_demotion(
        &self,
        req: Request<pb::ResetDemotionRequest>,
    ) -> Result<Response<pb::ResetDemotionResponse>, Status> {
        let by = caller(&req)?;
        let r = req.into_inner();
        let symptom = convert::symptom("symptom", &r.symptom)?;
        let actuator = convert::required_id("actuator", &r.actuator)?;
        self.backend
            .controls
            .reset_demotion(symptom, actuator, &by.to_string(), self.backend.clock.now())
            .map_err(|e| control_status(&e))?;
        info!(by = %by, symptom = symptom.as_str(), actuator, "Demotion reset by an operator.");
        Ok(Response::new(pb::ResetDemotionResponse {
            by: by.to_string(),
        }))
    }

    type WatchStream = futures::stream::BoxStream<'static, Result<pb::WatchEvent, Status>>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let by = caller(&req)?;
        let stream = Api::watch(self, &req.into_inner().cursor)?;
        debug!(by = %by, "Watch started.");
        Ok(Response::new(Box::pin(stream)))
    }
}
