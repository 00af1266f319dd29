-- An incident that nothing on its ladder can help any more, and the durable
-- mapping from agent SPIFFE IDs to configured agent names. SQLite flavour;
-- migrations/postgres/0002_needs_operator_and_agent_identities.sql is the
-- same logical schema. Conventions as in 0001_init.sql.

-- Why an operator must act (a sentence for a person) and when that was
-- decided; both NULL until then. Added in place: existing incidents keep
-- their rows and read as not needing an operator.
ALTER TABLE incidents ADD COLUMN needs_operator TEXT;
ALTER TABLE incidents ADD COLUMN needs_operator_at_ms INTEGER
    CHECK ((needs_operator IS NULL) = (needs_operator_at_ms IS NULL));

-- One row per agent SPIFFE ID ever learned. Re-learning a known ID widens
-- [first_seen, last_seen], and the sighting with the latest time also sets
-- `agent` and `source`: an ID that moved to another configured name (the
-- config changed) follows the newest sighting. Rows are never deleted: a
-- few per agent (one per identity it attested with).
CREATE TABLE agent_identities (
    spiffe_id     TEXT    NOT NULL PRIMARY KEY,
    agent         TEXT    NOT NULL,
    -- IdentitySource::as_str.
    source        TEXT    NOT NULL CHECK (source IN ('debug_api', 'node_alias')),
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER NOT NULL,
    CHECK (first_seen_ms <= last_seen_ms)
) STRICT, WITHOUT ROWID;
