-- Issue 21: the `ts` index also carries the identities a correction or a
-- daily projection names (`user`, `key`; `seq` is the rowid, in every index).
-- A restatement of one key's hour in `by_user` (finest table: a day) reads
-- the day's events of that key's users: with these columns it finds them in
-- the index alone and fetches just those rows, instead of reading the day's
-- every row to test it. The index still grows at its right edge, unlike a
-- separate (user, ts) index (BENCHMARKS.md).
DROP INDEX usage_events_ts_idx;
CREATE INDEX usage_events_ts_idx ON usage_events (ts, "user", key);
