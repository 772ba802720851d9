-- Issue 21: the `ts` index also carries the identities a correction or a
-- daily projection names (`user`, `key`) and the row's `seq`. A restatement
-- of one key's hour in `by_user` (finest table: a day) reads the day's events
-- of that key's users: with these columns it finds them in the index alone
-- (an index-only scan) and fetches just those rows, instead of reading the
-- day's every row to test it. A separate (user, ts) B-tree would cost the
-- append path about a quarter of its rate (random inserts); the wider `ts`
-- index still grows at its right edge (no measurable cost, BENCHMARKS.md).
CREATE INDEX usage_events_ts_cover_idx ON usage_events (ts) INCLUDE ("user", key, seq);
DROP INDEX usage_events_ts_idx;
ALTER INDEX usage_events_ts_cover_idx RENAME TO usage_events_ts_idx;

-- Index-only scans skip the row only on pages the visibility map marks
-- all-visible, which an insert-only table gets from autovacuum: by default
-- after inserts of 20% of the table (two million rows at ten million), so
-- the most recent days, where corrections happen, would stay unmarked.
ALTER TABLE usage_events SET (autovacuum_vacuum_insert_scale_factor = 0.01);
