-- Leadership of the cluster role, with fencing. SQLite flavour; migrations/postgres/0006_leadership.sql is the same logical schema (expiry there on the database clock).
--
-- One row per leadership name (`[leadership] name`). Each new leader bumps
-- `epoch` when it takes over; every write of a fenced instance checks, in
-- its own transaction, that the row still holds its epoch, so a former
-- leader that wakes up after losing its lease (paused, partitioned) can
-- record, and therefore start, nothing.
CREATE TABLE leadership (
    name        TEXT    NOT NULL PRIMARY KEY,
    -- Fencing token: strictly increasing, one per leader.
    epoch       INTEGER NOT NULL,
    -- Who holds it: "spire-healer host=… pid=… since_ms=…".
    holder      TEXT    NOT NULL,
    -- When this epoch began and until when its holder last renewed it
    -- (Unix milliseconds).
    acquired_at INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
) STRICT;

-- The leader epoch an action was started under (NULL: not fenced).
ALTER TABLE actions ADD COLUMN epoch INTEGER;
