-- Actions an actuator held at execute time: outcome `held` (a
-- PodDisruptionBudget refused an eviction, a workload mapped to no pods).
-- Such an action did nothing; its verification is `skipped`. PostgreSQL
-- flavour; migrations/sqlite/0007_held_outcome.sql is the same logical
-- schema. Conventions as in 0001_init.sql.

ALTER TABLE actions DROP CONSTRAINT actions_outcome_check;
ALTER TABLE actions ADD CONSTRAINT actions_outcome_check
    CHECK (outcome IN ('ok', 'error', 'dry_run', 'timeout', 'held'));
