-- Per-connection wasm workloads: they have no instances; every online,
-- undrained node that matches a workload's constraints runs a listener for
-- it (DesiredSet.listeners). These rows are what each node last reported
-- about its listeners, replaced whole per node on every report. The
-- listener's ID (`lst-<release id>-<workload>`) names its release and
-- workload; env, release and workload are kept beside it for queries.

-- `state` is starting | listening | failed. `active`, `served` and
-- `failed` are the node's connection counters since the listener started
-- there; `last_failure_at` is when the control plane last saw `failed`
-- grow.
CREATE TABLE listeners (
    node_id               TEXT NOT NULL REFERENCES nodes (id),
    id                    TEXT NOT NULL,
    env_id                TEXT NOT NULL REFERENCES envs (id),
    release_id            TEXT NOT NULL REFERENCES releases (id),
    workload              TEXT NOT NULL,
    state                 TEXT NOT NULL,
    message               TEXT,
    address               TEXT,
    active                BIGINT NOT NULL DEFAULT 0,
    served                BIGINT NOT NULL DEFAULT 0,
    failed                BIGINT NOT NULL DEFAULT 0,
    last_failure          TEXT,
    last_failure_category TEXT,
    last_failure_at       BIGINT,
    updated_at            BIGINT NOT NULL,
    PRIMARY KEY (node_id, id)
);
CREATE INDEX listeners_env ON listeners (env_id, workload);

-- A digest of the listeners a node should run, as the reconciler last
-- computed it: when it changes, the node's desired_version is bumped.
ALTER TABLE nodes ADD COLUMN listeners_digest TEXT;
