-- Endpoint addresses and ports, nodes behind NAT, ingress reports.

-- A node that cannot be dialled: ingresses reach its instances through its
-- session with the control plane. 0 or 1.
ALTER TABLE nodes ADD COLUMN behind_nat BIGINT NOT NULL DEFAULT 0;

-- The addresses of each env's endpoints: allocated when a release that
-- declares the endpoint becomes current (deploy, rollback), kept while
-- later current releases keep it, freed when the current release drops it.
CREATE TABLE endpoint_addresses (
    id         TEXT PRIMARY KEY,
    env_id     TEXT NOT NULL REFERENCES envs (id),
    name       TEXT NOT NULL,
    ipv6       TEXT NOT NULL,
    ipv4       TEXT,
    created_at BIGINT NOT NULL,
    UNIQUE (env_id, name)
);

-- Every address and port an endpoint listens on. The primary key is what
-- makes two endpoints on one address and port impossible, also between
-- control-plane replicas deploying at the same time.
CREATE TABLE endpoint_ports (
    address     TEXT NOT NULL,
    port        BIGINT NOT NULL,
    endpoint_id TEXT NOT NULL REFERENCES endpoint_addresses (id),
    PRIMARY KEY (address, port)
);

-- What each ingress last reported (JSON of verge_api::routing::IngressReport).
CREATE TABLE ingresses (
    name    TEXT PRIMARY KEY,
    report  TEXT NOT NULL,
    seen_at BIGINT NOT NULL
);
