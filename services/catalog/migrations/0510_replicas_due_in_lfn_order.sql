-- Due replicas in LFN order among those due at the same time: a forwarder
-- claims a plan's replicas (all due at once) a batch at a time, and a batch
-- of neighbouring LFNs holds the files of one directory together (one
-- `xrdcp` of many files each), read from the index in order.
DROP INDEX replicas_due;
CREATE INDEX replicas_due ON replicas (next_try_at, lfn) WHERE state NOT IN ('verified', 'registered');
