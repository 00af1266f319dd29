-- Retention (rows pruned by age, `[database.retention]`) and a compact key
-- for SVID lifecycles. SQLite flavour;
-- migrations/postgres/0005_retention_and_svid_names.sql is the same logical
-- schema. Conventions as in 0001_init.sql.

-- SVID lifecycles were keyed by (agent, spiffe_id, serial) in a WITHOUT
-- ROWID table: every row repeated two long texts, and each 5,000-row batch
-- of new serials rewrote thousands of pages all over that key. Now the
-- (agent, SPIFFE ID) pairs are written once, in `svid_names`, and a
-- lifecycle names its pair by `name_id`: rows are appended in rowid order
-- and the unique key (name_id, serial) that keeps a re-applied SvidSeen a
-- no-op is a small index. The rows are carried over.

-- One row per (agent, SPIFFE ID) pair that ever served an SVID. A pair no
-- lifecycle names any more is pruned with the lifecycles.
CREATE TABLE svid_names (
    id        INTEGER NOT NULL PRIMARY KEY,
    agent     TEXT    NOT NULL,
    spiffe_id TEXT    NOT NULL,
    UNIQUE (agent, spiffe_id)
) STRICT;

INSERT INTO svid_names (agent, spiffe_id)
    SELECT DISTINCT agent, spiffe_id FROM svid_lifecycles ORDER BY agent, spiffe_id;

CREATE TABLE svid_lifecycles_0005 (
    -- svid_names.id (no foreign key, as everywhere).
    name_id        INTEGER NOT NULL,
    -- Lower-case hex; empty when the leaf did not parse.
    serial         TEXT    NOT NULL,
    -- No ordering CHECK: an invalid SVID is still recorded as served.
    not_before_ms  INTEGER NOT NULL,
    not_after_ms   INTEGER NOT NULL,
    first_seen_ms  INTEGER NOT NULL,
    -- NULL while the serial is served: such a row is never pruned.
    replaced_at_ms INTEGER,
    UNIQUE (name_id, serial)
) STRICT;

INSERT INTO svid_lifecycles_0005
    (name_id, serial, not_before_ms, not_after_ms, first_seen_ms, replaced_at_ms)
    SELECT n.id, s.serial, s.not_before_ms, s.not_after_ms, s.first_seen_ms, s.replaced_at_ms
    FROM svid_lifecycles s JOIN svid_names n ON n.agent = s.agent AND n.spiffe_id = s.spiffe_id
    ORDER BY s.first_seen_ms;

DROP TABLE svid_lifecycles;
ALTER TABLE svid_lifecycles_0005 RENAME TO svid_lifecycles;

-- Listings, newest first.
CREATE INDEX svid_lifecycles_first_seen ON svid_lifecycles (first_seen_ms);

-- Pruning, oldest first: replaced lifecycles by replacement time, closed
-- incidents by closing time. Holds (holds_at), audit rows (audit_at) and
-- the rows of an incident (actions_incident, approvals_incident,
-- holds_incident) have theirs.
CREATE INDEX svid_lifecycles_replaced ON svid_lifecycles (replaced_at_ms)
    WHERE replaced_at_ms IS NOT NULL;
CREATE INDEX incidents_closed ON incidents (closed_at_ms) WHERE closed_at_ms IS NOT NULL;
