-- Installation leases.
-- One scheduler per installation among all replicas: the owner runs
-- its rounds until expires_at, renewing it; another takes it over only
-- after it expired (lease.rs).
CREATE TABLE installation_leases (
    installation text PRIMARY KEY,
    owner        text NOT NULL,
    expires_at   timestamptz NOT NULL,
    acquired_at  timestamptz NOT NULL DEFAULT now(),
    renewed_at   timestamptz NOT NULL DEFAULT now()
);
