-- Where the jobs of a production write their outputs when they run on an
-- installation that does not share the dispatcher's work directory: the
-- production's first forwarding destination (from request.accepted), or
-- none when its outputs are not forwarded.
ALTER TABLE productions ADD COLUMN output_destination text;
