-- Nodes, the tokens they join with, and the instances placed on them.

-- `verge nodes join-token`: the secret is kept only as a SHA-256 hash.
-- Good for `max_uses` joins (one by default) until it expires.
CREATE TABLE join_tokens (
    id          TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    created_by  TEXT NOT NULL,
    uses        BIGINT NOT NULL DEFAULT 0,
    max_uses    BIGINT NOT NULL DEFAULT 1
);

CREATE TABLE nodes (
    id              TEXT PRIMARY KEY,
    name            TEXT COLLATE "C" NOT NULL UNIQUE,
    labels          TEXT NOT NULL,          -- JSON object
    cpu_millis      BIGINT NOT NULL,        -- capacity
    memory          BIGINT NOT NULL,
    usage           TEXT,                   -- JSON of the last heartbeat's wire::Usage
    isolation       TEXT NOT NULL,
    version         TEXT NOT NULL,
    state           TEXT NOT NULL,          -- online | offline
    state_since     BIGINT NOT NULL,
    last_seen       BIGINT,
    prefix_index    BIGINT NOT NULL UNIQUE, -- which /64 of the cluster's instance prefix
    instance_prefix TEXT NOT NULL,
    cert_sha256     TEXT NOT NULL UNIQUE,   -- the client certificate it must present
    joined_at       BIGINT NOT NULL,
    join_token_id   TEXT NOT NULL,
    desired_version BIGINT NOT NULL DEFAULT 0,  -- bumped when its desired set changes
    applied_version BIGINT NOT NULL DEFAULT 0   -- the last one it reported
);

-- One row per instance the control plane wants, or wanted until its node
-- confirms it stopped. `goal` is what the control plane wants (run | stop);
-- the other state columns are what the node last reported.
CREATE TABLE instances (
    id          TEXT PRIMARY KEY,
    env_id      TEXT NOT NULL REFERENCES envs (id),
    release_id  TEXT NOT NULL REFERENCES releases (id),
    workload    TEXT COLLATE "C" NOT NULL,
    slot        BIGINT NOT NULL,
    node_id     TEXT REFERENCES nodes (id),
    goal        TEXT NOT NULL,
    state       TEXT NOT NULL,
    category    TEXT,
    message     TEXT,
    address     TEXT,
    restarts    BIGINT NOT NULL DEFAULT 0,
    cpu_millis  BIGINT NOT NULL,
    memory      BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE INDEX instances_env ON instances (env_id, workload, slot);
CREATE INDEX instances_node ON instances (node_id);
