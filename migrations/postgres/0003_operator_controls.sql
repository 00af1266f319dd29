-- Operator controls (approvals, pause and dry run, demotions), the audit
-- trail of every decision, and newest-first paging for the listings.
-- PostgreSQL flavour; migrations/sqlite/0003_operator_controls.sql is the
-- same logical schema. Conventions as in 0001_init.sql.
--
-- Paging: every listing is ordered by (time column, id), newest first, and
-- the next page starts strictly below the last row's pair. Each listing's
-- filter and that order share one index, so a page is an index range, not
-- a sort.

DROP INDEX incidents_opened_at;
CREATE INDEX incidents_opened_at ON incidents (opened_at_ms, id);
DROP INDEX incidents_open;
-- Read at every start (load_knowledge) and by `open_only` listings.
CREATE INDEX incidents_open ON incidents (opened_at_ms, id) WHERE closed_at_ms IS NULL;
CREATE INDEX incidents_symptom ON incidents (symptom, opened_at_ms, id);

DROP INDEX actions_started_at;
CREATE INDEX actions_started_at ON actions (started_at_ms, id);
DROP INDEX actions_incident;
CREATE INDEX actions_incident ON actions (incident_id, started_at_ms, id);
-- The demotion window at start: the last verdicts of each (symptom,
-- actuator), and the distinct pairs by skipping through it.
CREATE INDEX actions_verdicts ON actions (symptom, actuator, verified_at_ms, id)
    WHERE verification IN ('verified', 'failed');

-- Holds keep their identity `id`: stable, unique, and the tie-breaker of
-- their page key.
DROP INDEX holds_at;
CREATE INDEX holds_at ON holds (at_ms, id);
CREATE INDEX holds_incident ON holds (incident_id, at_ms, id);

-- One row per step that waited for a person's yes. `state` only moves
-- forward: pending, then approved, then a final state (rejected, expired,
-- used, withdrawn); a final state is never overwritten. `decided_by` and
-- `reason` are the operator's and survive the loop's later `used`;
-- `decided_at_ms` is the last change.
CREATE TABLE approvals (
    id              TEXT   NOT NULL PRIMARY KEY,
    incident_id     TEXT   NOT NULL,
    symptom         TEXT   NOT NULL,
    rung            BIGINT NOT NULL CHECK (rung >= 0),
    actuator        TEXT   NOT NULL,
    target          TEXT   NOT NULL,
    -- ApprovalState::as_str.
    state           TEXT   NOT NULL CHECK (state IN ('pending', 'approved', 'rejected',
                                                     'expired', 'used', 'withdrawn')),
    requested_at_ms BIGINT NOT NULL,
    expires_at_ms   BIGINT NOT NULL,
    decided_by      TEXT,
    decided_at_ms   BIGINT,
    reason          TEXT,
    -- The action it became (`used`).
    action_id       TEXT,
    CHECK ((state = 'pending') = (decided_at_ms IS NULL))
);

CREATE INDEX approvals_requested_at ON approvals (requested_at_ms, id);
-- Pending ones (`open_only`) and the live ones read at start.
CREATE INDEX approvals_state ON approvals (state, requested_at_ms, id);
CREATE INDEX approvals_incident ON approvals (incident_id, requested_at_ms, id);

-- Every change of an operator control, in the order applied (`seq`). The
-- last one per control is in force: order by `seq`, not by time, so a
-- clock that stepped back cannot bring an older change back.
CREATE TABLE control_changes (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The event's id: a re-applied change is a no-op.
    id         TEXT   NOT NULL UNIQUE,
    -- ControlChange::control.
    control    TEXT   NOT NULL CHECK (control IN ('pause', 'dry_run')),
    -- ControlChange::as_str.
    change     TEXT   NOT NULL CHECK (change IN ('paused', 'resumed',
                                                 'dry_run_on', 'dry_run_off')),
    changed_by TEXT   NOT NULL,
    reason     TEXT,
    at_ms      BIGINT NOT NULL
);

CREATE INDEX control_changes_last ON control_changes (control, seq);

-- One row per demotion of a (symptom, actuator) step; a reset closes it
-- (reset_at_ms, reset_by). At most one open row per pair. The pair's
-- latest reset_at_ms is where its verdict window starts afresh.
CREATE TABLE demotions (
    symptom       TEXT   NOT NULL,
    actuator      TEXT   NOT NULL,
    -- Verified runs and runs in the window that demoted it.
    verified      BIGINT NOT NULL,
    runs          BIGINT NOT NULL,
    demoted_at_ms BIGINT NOT NULL,
    reset_at_ms   BIGINT,
    reset_by      TEXT,
    CHECK ((reset_at_ms IS NULL) = (reset_by IS NULL)),
    PRIMARY KEY (symptom, actuator, demoted_at_ms)
);

-- One row per decision: acted, held, needs_operator, an approval's every
-- state, a control change, a demotion and its reset. `id` is derived from
-- the event (`<kind>:<natural key>`), so a re-applied batch writes nothing
-- twice. `kind` is open-ended, like hold reasons.
CREATE TABLE audit (
    id          TEXT   NOT NULL PRIMARY KEY,
    at_ms       BIGINT NOT NULL,
    kind        TEXT   NOT NULL,
    -- LOOP_ACTOR, or the operator's principal.
    actor       TEXT   NOT NULL,
    incident_id TEXT,
    action_id   TEXT,
    approval_id TEXT,
    symptom     TEXT,
    actuator    TEXT,
    target      TEXT,
    reason      TEXT,
    detail      JSONB  NOT NULL
);

CREATE INDEX audit_at ON audit (at_ms, id);
CREATE INDEX audit_incident ON audit (incident_id, at_ms, id);
