-- Observation frames for `spire-healer replay`: what the loop sensed in one
-- tick (every view, the handshake outcomes drained that tick), recorded
-- around symptoms only (a pre-roll before, a post-roll after) and pruned by
-- age (`[replay] retention`). SQLite flavour;
-- migrations/postgres/0004_replay_frames.sql is the same logical schema.
-- Conventions as in 0001_init.sql.

-- One row per recorded tick. `run_id` names the process that recorded it
-- and `seq` counts that process's ticks, recorded or not: a missing `seq`
-- is a gap, which resets the replay's memory. `frame` is the frame's JSON,
-- opaque to SQL (never queried inside, so kept as text, byte for byte).
CREATE TABLE replay_frames (
    run_id TEXT    NOT NULL,
    seq    INTEGER NOT NULL CHECK (seq >= 0),
    at_ms  INTEGER NOT NULL,
    frame  TEXT    NOT NULL,
    PRIMARY KEY (run_id, seq)
) STRICT;

-- Replay reads a time range in (at_ms, run_id, seq) order; pruning deletes
-- the oldest first.
CREATE INDEX replay_frames_at ON replay_frames (at_ms, run_id, seq);
