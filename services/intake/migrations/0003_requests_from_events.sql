-- Requests from events.
ALTER TABLE requests ADD COLUMN correlation_id text, ADD COLUMN reply_to text;
