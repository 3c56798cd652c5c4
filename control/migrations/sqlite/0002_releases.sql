-- Desired state of envs: versioned env vars, versioned encrypted secret
-- bundles, immutable releases, scale overrides and the append-only event log.

-- Every `verge env set/unset` writes a new version holding the whole map.
CREATE TABLE config_versions (
    env_id      TEXT NOT NULL REFERENCES envs (id),
    version     BIGINT NOT NULL,
    vars        TEXT NOT NULL,          -- JSON object NAME -> value
    created_at  BIGINT NOT NULL,
    created_by  TEXT NOT NULL,
    PRIMARY KEY (env_id, version)
);

-- Every `verge secrets set/unset` writes a new version of one bundle. Values
-- are sealed with an AEAD (see control/src/secrets.rs); a deleted version
-- keeps its number, key names and digest, and loses its ciphertext.
CREATE TABLE secret_versions (
    env_id      TEXT NOT NULL REFERENCES envs (id),
    bundle      TEXT NOT NULL,
    version     BIGINT NOT NULL,
    keys        TEXT NOT NULL,          -- JSON array of key names
    digest      TEXT NOT NULL,
    key_id      TEXT,                   -- which data key sealed it
    nonce       TEXT,
    ciphertext  TEXT,
    created_at  BIGINT NOT NULL,
    created_by  TEXT NOT NULL,
    deleted_at  BIGINT,
    PRIMARY KEY (env_id, bundle, version)
);

-- Immutable: the triggers below refuse UPDATE and DELETE.
CREATE TABLE releases (
    id              TEXT PRIMARY KEY,
    env_id          TEXT NOT NULL REFERENCES envs (id),
    number          BIGINT NOT NULL,
    manifest        TEXT NOT NULL,      -- JSON snapshot, images pinned
    images          TEXT NOT NULL,      -- JSON object workload -> ref@sha256:...
    config_version  BIGINT NOT NULL,
    secrets         TEXT NOT NULL,      -- JSON object bundle -> version
    fingerprint     TEXT NOT NULL,
    parent_id       TEXT REFERENCES releases (id),
    created_at      BIGINT NOT NULL,
    created_by      TEXT NOT NULL,
    UNIQUE (env_id, number)
);

CREATE TRIGGER releases_refuse_update BEFORE UPDATE ON releases
BEGIN
    SELECT RAISE(ABORT, 'releases are immutable: UPDATE refused');
END;

CREATE TRIGGER releases_refuse_delete BEFORE DELETE ON releases
BEGIN
    SELECT RAISE(ABORT, 'releases are immutable: DELETE refused');
END;

-- The env's current release: the one mutable pointer, moved by compare-and-set.
ALTER TABLE envs ADD COLUMN current_release TEXT REFERENCES releases (id);

-- `verge scale`: per workload, what overrides the release's manifest.
CREATE TABLE scale_overrides (
    env_id      TEXT NOT NULL REFERENCES envs (id),
    workload    TEXT NOT NULL,
    count       BIGINT,
    cpu_millis  BIGINT,
    memory      BIGINT,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (env_id, workload)
);

-- Append-only. `cursor` comes from the `events` counter, taken under the
-- counter's row lock inside the mutating transaction: cursors become visible
-- in order, so a follower reading "cursor > N" never skips one.
CREATE TABLE events (
    cursor      BIGINT PRIMARY KEY,
    org_id      TEXT REFERENCES orgs (id),   -- NULL: a cluster event (nodes)
    app_id      TEXT REFERENCES apps (id),
    env_id      TEXT REFERENCES envs (id),
    release_id  TEXT,
    instance_id TEXT,
    node_id     TEXT,
    kind        TEXT NOT NULL,
    message     TEXT NOT NULL,
    actor       TEXT,
    created_at  BIGINT NOT NULL
);
CREATE INDEX events_env ON events (env_id, cursor);
CREATE INDEX events_org ON events (org_id, cursor);

CREATE TRIGGER events_refuse_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only: UPDATE refused');
END;

CREATE TRIGGER events_refuse_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only: DELETE refused');
END;

CREATE TABLE counters (
    name        TEXT PRIMARY KEY,
    value       BIGINT NOT NULL
);
INSERT INTO counters (name, value) VALUES ('events', 0);
