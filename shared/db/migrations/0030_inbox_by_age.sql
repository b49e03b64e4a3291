-- Inbox by age: the index the inbox's pruning reads.
CREATE INDEX IF NOT EXISTS inbox_received_at ON inbox (received_at);
