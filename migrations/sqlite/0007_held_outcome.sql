-- Actions an actuator held at execute time: outcome `held` (a
-- PodDisruptionBudget refused an eviction, a workload mapped to no pods).
-- Such an action did nothing; its verification is `skipped`. SQLite
-- flavour; migrations/postgres/0007_held_outcome.sql is the same logical
-- schema. Conventions as in 0001_init.sql.

-- Widening the outcome CHECK in SQLite means rebuilding the table: the
-- rows are carried over (with 0006's `epoch`), then the indexes made again
-- as 0001 and 0003 left them.
CREATE TABLE actions_0007 (
    id             TEXT    NOT NULL PRIMARY KEY,
    incident_id    TEXT    NOT NULL,
    symptom        TEXT    NOT NULL,
    rung           INTEGER NOT NULL CHECK (rung >= 0),
    actuator       TEXT    NOT NULL,
    target         TEXT    NOT NULL,
    params         TEXT    NOT NULL CHECK (json_valid(params)),
    dry_run        INTEGER NOT NULL CHECK (dry_run IN (0, 1)),
    started_at_ms  INTEGER NOT NULL,
    finished_at_ms INTEGER,
    outcome        TEXT    CHECK (outcome IN ('ok', 'error', 'dry_run', 'timeout', 'held')),
    detail         TEXT    CHECK (json_valid(detail)),
    error          TEXT,
    verification   TEXT    CHECK (verification IN ('verified', 'failed', 'skipped')),
    verified_at_ms INTEGER,
    -- The leader epoch an action was started under (NULL: not fenced).
    epoch          INTEGER,
    CHECK ((finished_at_ms IS NULL) = (outcome IS NULL)),
    CHECK ((verified_at_ms IS NULL) = (verification IS NULL))
) STRICT;

INSERT INTO actions_0007
    (id, incident_id, symptom, rung, actuator, target, params, dry_run, started_at_ms,
     finished_at_ms, outcome, detail, error, verification, verified_at_ms, epoch)
    SELECT id, incident_id, symptom, rung, actuator, target, params, dry_run, started_at_ms,
           finished_at_ms, outcome, detail, error, verification, verified_at_ms, epoch
    FROM actions;

DROP TABLE actions;
ALTER TABLE actions_0007 RENAME TO actions;

-- Cooldown lookups: last action of this actuator on this target.
CREATE INDEX actions_cooldown ON actions (target, actuator, started_at_ms);
CREATE INDEX actions_started_at ON actions (started_at_ms, id);
CREATE INDEX actions_incident ON actions (incident_id, started_at_ms, id);
-- The demotion window at start: the last verdicts of each (symptom,
-- actuator), and the distinct pairs by skipping through it.
CREATE INDEX actions_verdicts ON actions (symptom, actuator, verified_at_ms, id)
    WHERE verification IN ('verified', 'failed');
