-- Rollouts, health verdicts, drains, and each node's reservations.

-- The last health verdict a node reported: NULL (no check, not yet
-- checked, not running), 1 healthy, 0 unhealthy.
ALTER TABLE instances ADD COLUMN healthy BIGINT;

-- `verge nodes drain`: NULL (schedulable), 'draining' or 'drained'.
ALTER TABLE nodes ADD COLUMN drain TEXT;
-- When a drain stops what is left on the node, ready replacements or not.
ALTER TABLE nodes ADD COLUMN drain_deadline BIGINT;
-- CPU and memory reserved by the instances placed on the node with goal
-- `run`, kept in step with `instances` by every change of placement or
-- goal, so placing reads one row per node rather than every instance.
ALTER TABLE nodes ADD COLUMN used_cpu_millis BIGINT NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN used_memory BIGINT NOT NULL DEFAULT 0;
UPDATE nodes SET
    used_cpu_millis = COALESCE((SELECT SUM(cpu_millis) FROM instances i
        WHERE i.node_id = nodes.id AND i.goal = 'run'), 0),
    used_memory = COALESCE((SELECT SUM(memory) FROM instances i
        WHERE i.node_id = nodes.id AND i.goal = 'run'), 0);

-- One row per change of what an env should run: deploy, rollback, scale,
-- automatic rollback, cancel. The latest row of an env is its rollout.
CREATE TABLE rollouts (
    id              TEXT PRIMARY KEY,
    env_id          TEXT NOT NULL REFERENCES envs (id),
    release_id      TEXT NOT NULL REFERENCES releases (id),
    from_release_id TEXT REFERENCES releases (id),
    kind            TEXT NOT NULL,       -- deploy | rollback | scale | auto_rollback | cancel
    state           TEXT NOT NULL,       -- pending | in_progress | completed | failed | partial | canceled
    reason          TEXT,
    step            TEXT,
    category        TEXT,
    total           BIGINT NOT NULL DEFAULT 0,
    done            BIGINT NOT NULL DEFAULT 0,
    failed          BIGINT NOT NULL DEFAULT 0,
    outgoing        BIGINT NOT NULL DEFAULT 0,
    deadline_ms     BIGINT NOT NULL,     -- longest time without progress
    progress_at     BIGINT NOT NULL,     -- when `done` last grew (or it started)
    created_at      BIGINT NOT NULL,
    created_by      TEXT,
    ended_at        BIGINT
);
CREATE INDEX rollouts_env ON rollouts (env_id, created_at);

-- Envs deployed before rollouts existed: their current release, completed.
INSERT INTO rollouts (id, env_id, release_id, kind, state, deadline_ms, progress_at, created_at, ended_at)
SELECT 'ro_' || e.id, e.id, e.current_release, 'deploy', 'completed', 300000, r.created_at, r.created_at, r.created_at
FROM envs e JOIN releases r ON r.id = e.current_release;
