-- Retention (rows pruned by age, `[database.retention]`) and a compact key
-- for SVID lifecycles. PostgreSQL flavour;
-- migrations/sqlite/0005_retention_and_svid_names.sql is the same logical
-- schema. Conventions as in 0001_init.sql.

-- SVID lifecycles were keyed by (agent, spiffe_id, serial): every row and
-- every key repeated two long texts. Now the (agent, SPIFFE ID) pairs are
-- written once, in `svid_names`, and a lifecycle names its pair by
-- `name_id`; the unique key (name_id, serial) keeps a re-applied SvidSeen
-- a no-op. The rows are carried over.

-- One row per (agent, SPIFFE ID) pair that ever served an SVID. A pair no
-- lifecycle names any more is pruned with the lifecycles.
CREATE TABLE svid_names (
    id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    agent     TEXT   NOT NULL,
    spiffe_id TEXT   NOT NULL,
    UNIQUE (agent, spiffe_id)
);

INSERT INTO svid_names (agent, spiffe_id)
    SELECT DISTINCT agent, spiffe_id FROM svid_lifecycles ORDER BY agent, spiffe_id;

DROP INDEX svid_lifecycles_first_seen;
ALTER TABLE svid_lifecycles RENAME TO svid_lifecycles_0004;
ALTER TABLE svid_lifecycles_0004 RENAME CONSTRAINT svid_lifecycles_pkey TO svid_lifecycles_0004_pkey;

CREATE TABLE svid_lifecycles (
    -- svid_names.id (no foreign key, as everywhere).
    name_id        BIGINT NOT NULL,
    -- Lower-case hex; empty when the leaf did not parse.
    serial         TEXT   NOT NULL,
    -- No ordering CHECK: an invalid SVID is still recorded as served.
    not_before_ms  BIGINT NOT NULL,
    not_after_ms   BIGINT NOT NULL,
    first_seen_ms  BIGINT NOT NULL,
    -- NULL while the serial is served: such a row is never pruned.
    replaced_at_ms BIGINT,
    PRIMARY KEY (name_id, serial)
);

INSERT INTO svid_lifecycles
    (name_id, serial, not_before_ms, not_after_ms, first_seen_ms, replaced_at_ms)
    SELECT n.id, s.serial, s.not_before_ms, s.not_after_ms, s.first_seen_ms, s.replaced_at_ms
    FROM svid_lifecycles_0004 s JOIN svid_names n USING (agent, spiffe_id)
    ORDER BY s.first_seen_ms;

DROP TABLE svid_lifecycles_0004;

-- Listings, newest first.
CREATE INDEX svid_lifecycles_first_seen ON svid_lifecycles (first_seen_ms);

-- Pruning, oldest first: replaced lifecycles by replacement time, closed
-- incidents by closing time. Holds (holds_at), audit rows (audit_at) and
-- the rows of an incident (actions_incident, approvals_incident,
-- holds_incident) have theirs.
CREATE INDEX svid_lifecycles_replaced ON svid_lifecycles (replaced_at_ms)
    WHERE replaced_at_ms IS NOT NULL;
CREATE INDEX incidents_closed ON incidents (closed_at_ms) WHERE closed_at_ms IS NOT NULL;
