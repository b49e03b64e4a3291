-- Container templates derived by requests, reusable by name in later ones.
-- A derivation is recorded when the request deriving it is accepted; its
-- definition is the resolved template (image pinned by digest, runtime,
-- entrypoint, merged parameters) and its version names the shipped template,
-- the image digest and the parameters' hash.
CREATE TABLE derived_templates (
    name        text PRIMARY KEY,
    profile     text NOT NULL,
    version     text NOT NULL,
    definition  jsonb NOT NULL,
    recorded_by text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
