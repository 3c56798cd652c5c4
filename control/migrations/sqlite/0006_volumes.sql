-- Volumes: persistent storage of one env on one node, and their snapshots
-- (kept on the same node). The node holds the data under
-- `<data>/volumes/<id>/`; these rows are what the control plane knows.

-- `state` is the volume's lifecycle: creating | ready | resizing |
-- restoring | deleting | failed. `op` is the operation running on it now
-- (create, resize, snapshot, restore, delete), NULL when none: one at a
-- time. An op whose `op_started` is long past was abandoned (its control
-- plane stopped) and may be taken over. `used`, `used_at` and `backend`
-- are what the node last reported in a heartbeat.
CREATE TABLE volumes (
    id         TEXT PRIMARY KEY,
    env_id     TEXT NOT NULL REFERENCES envs (id),
    name       TEXT NOT NULL,
    node_id    TEXT NOT NULL REFERENCES nodes (id),
    size       BIGINT NOT NULL,
    state      TEXT NOT NULL,
    used       BIGINT,
    used_at    BIGINT,
    backend    TEXT,
    message    TEXT,
    op         TEXT,
    op_started BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (env_id, name)
);
CREATE INDEX volumes_node ON volumes (node_id);

-- A snapshot outlives its volume (deleting a volume keeps its snapshots),
-- so it names the volume instead of referencing its row.
CREATE TABLE volume_snapshots (
    id          TEXT PRIMARY KEY,
    volume_id   TEXT NOT NULL,
    volume_name TEXT NOT NULL,
    env_id      TEXT NOT NULL REFERENCES envs (id),
    node_id     TEXT NOT NULL REFERENCES nodes (id),
    size        BIGINT NOT NULL,
    used        BIGINT,
    created_at  BIGINT NOT NULL
);
CREATE INDEX volume_snapshots_env ON volume_snapshots (env_id, volume_name);
