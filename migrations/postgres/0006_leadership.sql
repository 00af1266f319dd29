-- Leadership of the cluster role, with fencing. PostgreSQL flavour; migrations/sqlite/0006_leadership.sql is the same logical schema.
--
-- One row per leadership name (`[leadership] name`). Each new leader bumps
-- `epoch` when it takes over; every write of a fenced instance checks, in
-- its own transaction, that the row still holds its epoch, so a former
-- leader that wakes up after losing its lease (paused, partitioned) can
-- record, and therefore start, nothing.
CREATE TABLE leadership (
    name        TEXT   NOT NULL PRIMARY KEY,
    -- Fencing token: strictly increasing, one per leader.
    epoch       BIGINT NOT NULL,
    -- Who holds it: "spire-healer host=… pid=… since_ms=…".
    holder      TEXT   NOT NULL,
    -- When this epoch began and until when its holder last renewed it
    -- (the database clock).
    acquired_at TIMESTAMPTZ NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL
);

-- The leader epoch an action was started under (NULL: not fenced).
ALTER TABLE actions ADD COLUMN epoch BIGINT;
