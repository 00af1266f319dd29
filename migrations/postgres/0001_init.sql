-- Knowledge store schema, PostgreSQL flavour. migrations/sqlite/0001_init.sql
-- is the same logical schema; change both together.
--
-- Conventions:
-- * Timestamps are unix milliseconds, UTC, in BIGINT columns named `*_ms`.
-- * JSON is JSONB.
-- * CHECKs cover only closed sets that the domain types guarantee (severity,
--   subject kind, outcome, verification). Symptom names, resolutions and hold
--   reasons are open-ended and validated by the reader instead.
-- * No foreign keys: the write buffer may drop events under memory pressure
--   (see Buffer), and an orphaned action is better than a batch that can
--   never commit.
-- * Every write is idempotent by a natural key, so a batch whose commit
--   outcome is unknown can be applied again.

CREATE TABLE subjects (
    subject       TEXT   NOT NULL PRIMARY KEY,
    kind          TEXT   NOT NULL CHECK (kind IN ('agent', 'workload', 'server', 'cluster')),
    agent         TEXT   NOT NULL,
    first_seen_ms BIGINT NOT NULL,
    last_seen_ms  BIGINT NOT NULL,
    CHECK (first_seen_ms <= last_seen_ms)
);

CREATE TABLE svid_lifecycles (
    agent          TEXT   NOT NULL,
    spiffe_id      TEXT   NOT NULL,
    -- Lower-case hex; empty when the leaf did not parse.
    serial         TEXT   NOT NULL,
    -- No ordering CHECK: an invalid SVID is still recorded as served.
    not_before_ms  BIGINT NOT NULL,
    not_after_ms   BIGINT NOT NULL,
    first_seen_ms  BIGINT NOT NULL,
    replaced_at_ms BIGINT,
    PRIMARY KEY (agent, spiffe_id, serial)
);

CREATE INDEX svid_lifecycles_first_seen ON svid_lifecycles (first_seen_ms);

CREATE TABLE incidents (
    id                  TEXT   NOT NULL PRIMARY KEY,
    symptom             TEXT   NOT NULL,
    subject             TEXT   NOT NULL,
    severity            TEXT   NOT NULL CHECK (severity IN ('warning', 'critical')),
    opened_at_ms        BIGINT NOT NULL,
    closed_at_ms        BIGINT,
    resolution          TEXT,
    predicted_outage_ms BIGINT,
    evidence            JSONB  NOT NULL,
    next_rung           BIGINT NOT NULL DEFAULT 0 CHECK (next_rung >= 0),
    CHECK ((closed_at_ms IS NULL) = (resolution IS NULL))
);

CREATE INDEX incidents_opened_at ON incidents (opened_at_ms);
-- Read at every start (load_knowledge) and by `open_only` listings.
CREATE INDEX incidents_open ON incidents (opened_at_ms) WHERE closed_at_ms IS NULL;

CREATE TABLE actions (
    id             TEXT    NOT NULL PRIMARY KEY,
    incident_id    TEXT    NOT NULL,
    symptom        TEXT    NOT NULL,
    rung           BIGINT  NOT NULL CHECK (rung >= 0),
    actuator       TEXT    NOT NULL,
    target         TEXT    NOT NULL,
    params         JSONB   NOT NULL,
    dry_run        BOOLEAN NOT NULL,
    started_at_ms  BIGINT  NOT NULL,
    finished_at_ms BIGINT,
    outcome        TEXT    CHECK (outcome IN ('ok', 'error', 'dry_run', 'timeout')),
    detail         JSONB,
    error          TEXT,
    verification   TEXT    CHECK (verification IN ('verified', 'failed', 'skipped')),
    verified_at_ms BIGINT,
    CHECK ((finished_at_ms IS NULL) = (outcome IS NULL)),
    CHECK ((verified_at_ms IS NULL) = (verification IS NULL))
);

-- Cooldown lookups: last action of this actuator on this target.
CREATE INDEX actions_cooldown ON actions (target, actuator, started_at_ms);
CREATE INDEX actions_started_at ON actions (started_at_ms);
CREATE INDEX actions_incident ON actions (incident_id, started_at_ms);

CREATE TABLE holds (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    incident_id TEXT   NOT NULL,
    actuator    TEXT   NOT NULL,
    target      TEXT   NOT NULL,
    reason      TEXT   NOT NULL,
    at_ms       BIGINT NOT NULL,
    -- Natural key: makes a re-applied Held event a no-op.
    UNIQUE (incident_id, actuator, target, reason, at_ms)
);

CREATE INDEX holds_at ON holds (at_ms);
