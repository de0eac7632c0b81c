-- EXAI fleet schema. Idempotent: safe to apply on every start (`exai db migrate`, `exai up`).
-- Only ordinary DDL: no extensions, no superuser-only statements, so it runs on Supabase.
-- Keys are client-generated UUIDs so that every write can be replayed (ON CONFLICT DO NOTHING).
-- Write-behind tables (conversations, messages, tool_calls) carry no foreign keys on purpose:
-- their rows arrive in batches from a spool and must land whatever order a replay takes.

CREATE TABLE IF NOT EXISTS exai_schema_version (
    id          integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    version     integer NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per MCP client session the router has opened.
CREATE TABLE IF NOT EXISTS sessions (
    id            text PRIMARY KEY,
    principal     text,
    client_name   text,
    era           text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    ended_at      timestamptz,
    metadata      jsonb NOT NULL DEFAULT '{}'::jsonb
);

-- A conversation thread; its id is the continuation_id clients pass back.
CREATE TABLE IF NOT EXISTS conversations (
    id          uuid PRIMARY KEY,
    session_id  text,
    tool_name   text,
    model       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    metadata    jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS conversations_session_idx ON conversations (session_id);

CREATE TABLE IF NOT EXISTS messages (
    id               uuid PRIMARY KEY,
    conversation_id  uuid NOT NULL,
    seq              bigint NOT NULL DEFAULT 0,
    role             text NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
    content          text NOT NULL,
    session_id       text,
    tool_name        text,
    model            text,
    files            jsonb NOT NULL DEFAULT '[]'::jsonb,
    tokens_in        integer,
    tokens_out       integer,
    created_at       timestamptz NOT NULL DEFAULT now(),
    metadata         jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS messages_conversation_idx ON messages (conversation_id, created_at, seq);

-- Telemetry: one row per tool call (write-behind).
CREATE TABLE IF NOT EXISTS tool_calls (
    id           uuid PRIMARY KEY,
    session_id   text,
    instance_id  text,
    tool_name    text NOT NULL,
    status       text NOT NULL,
    duration_ms  double precision,
    model        text,
    tokens_in    integer,
    tokens_out   integer,
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS tool_calls_session_idx ON tool_calls (session_id, created_at);

-- Tasks are written directly (not write-behind) with optimistic locking on `version`.
CREATE TABLE IF NOT EXISTS tasks (
    id              uuid PRIMARY KEY,
    session_id      text,                      -- NULL: a global task every session sees
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 500),
    description     text NOT NULL DEFAULT '',
    state           text NOT NULL DEFAULT 'NOT_STARTED'
                    CHECK (state IN ('NOT_STARTED', 'IN_PROGRESS', 'CANCELLED', 'COMPLETE')),
    parent_task_id  uuid REFERENCES tasks (id) ON DELETE SET NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    completed_at    timestamptz,
    metadata        jsonb NOT NULL DEFAULT '{}'::jsonb,
    version         integer NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS tasks_session_idx ON tasks (session_id, state);
CREATE INDEX IF NOT EXISTS tasks_parent_idx ON tasks (parent_task_id);

-- One audit row per task change, written in the same transaction as the change.
CREATE TABLE IF NOT EXISTS task_events (
    id          uuid PRIMARY KEY,
    task_id     uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    session_id  text,
    event       text NOT NULL,              -- created | updated | state_changed | reopened
    from_state  text,
    to_state    text,
    version     integer NOT NULL,
    changes     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS task_events_task_idx ON task_events (task_id, version);

-- Structured notes per thread or per session.
CREATE TABLE IF NOT EXISTS notes (
    id          uuid PRIMARY KEY,
    scope       text NOT NULL CHECK (scope IN ('thread', 'session')),
    scope_id    text NOT NULL,
    key         text NOT NULL CHECK (length(key) BETWEEN 1 AND 200),
    body        text NOT NULL,
    kind        text NOT NULL DEFAULT 'note',
    importance  integer NOT NULL DEFAULT 0,
    version     integer NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (scope, scope_id, key)
);
-- Captured notes (context engineering, phase 3) say where they came from: `source` is 'manual'
-- (note_write) or 'auto' (extracted from a turn), `source_turn` the id of that turn's message.
ALTER TABLE notes ADD COLUMN IF NOT EXISTS source text NOT NULL DEFAULT 'manual';
ALTER TABLE notes ADD COLUMN IF NOT EXISTS source_turn text;

-- Linked sessions share context; stored once per pair with a < b.
CREATE TABLE IF NOT EXISTS session_links (
    session_a   text NOT NULL,
    session_b   text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_a, session_b),
    CHECK (session_a < session_b)
);

-- Version 2: who owns a thread or a task. With several principals (EXAI_AUTH_TOKENS) each sees
-- only its own (NULL: a row from before version 2, visible to all); one principal sees all.
ALTER TABLE conversations ADD COLUMN IF NOT EXISTS principal text;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS principal text;
CREATE INDEX IF NOT EXISTS tasks_principal_idx ON tasks (principal) WHERE session_id IS NULL;

INSERT INTO exai_schema_version (id, version) VALUES (1, 2)
ON CONFLICT (id) DO UPDATE SET version = GREATEST(exai_schema_version.version, EXCLUDED.version),
                               applied_at = now();

-- Version 3: link groups (linked sessions). A group's events have per-group ids 1, 2, 3, ...
-- taken from link_groups.seq in the transaction that stores the event (the group row lock
-- makes ids commit in order); each member keeps a cursor (read_upto) over them.
CREATE TABLE IF NOT EXISTS link_groups (
    name        text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 100),
    principal   text,
    seq         bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS link_members (
    group_name    text NOT NULL REFERENCES link_groups (name) ON DELETE CASCADE,
    session_id    text NOT NULL,
    principal     text,
    client_name   text,
    read_upto     bigint NOT NULL DEFAULT 0,
    joined_at     timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_name, session_id)
);
CREATE INDEX IF NOT EXISTS link_members_session_idx ON link_members (session_id);

CREATE TABLE IF NOT EXISTS link_events (
    group_name  text NOT NULL,
    id          bigint NOT NULL,
    kind        text NOT NULL,
    sender      text,
    recipient   text,
    subject     text,
    thread      text,
    body        text NOT NULL DEFAULT '',
    data        jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_name, id)
);

CREATE TABLE IF NOT EXISTS link_reservations (
    group_name  text NOT NULL REFERENCES link_groups (name) ON DELETE CASCADE,
    pattern     text NOT NULL,
    session_id  text NOT NULL,
    exclusive   boolean NOT NULL DEFAULT true,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (group_name, pattern, session_id)
);

INSERT INTO exai_schema_version (id, version) VALUES (1, 3)
ON CONFLICT (id) DO UPDATE SET version = GREATEST(exai_schema_version.version, EXCLUDED.version),
                               applied_at = now();

-- Version 4 (threads): a thread's exchanges are ordered by `pos`, a per-thread position taken
-- when the exchange is appended (both turns of one chat call share it; see docs/ARCHITECTURE.md,
-- "Thread order"). Rows written before it have pos NULL and sort first, by (created_at, seq).
ALTER TABLE messages ADD COLUMN IF NOT EXISTS pos bigint;
CREATE INDEX IF NOT EXISTS messages_conversation_pos_idx
    ON messages (conversation_id, pos NULLS FIRST, created_at, seq);

-- Threads whose turns were written while their writer could not reach Redis: every instance
-- polls this (a few rows a second at most) and drops those threads' Redis cache.
CREATE TABLE IF NOT EXISTS thread_cache_marks (
    id               uuid PRIMARY KEY,
    conversation_id  uuid NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS thread_cache_marks_created_idx ON thread_cache_marks (created_at);

-- Version 4 (links): linked sessions' events are written behind (the instance's spool -> its flusher).
-- `uuid` is the event's client-generated id: the flusher inserts it once (a replay after a
-- crash finds it and takes no new group id). A member's `chat_context` opts its chats into the
-- group's context by default; `handoff` is the note it leaves when its session ends.
ALTER TABLE link_events ADD COLUMN IF NOT EXISTS uuid uuid;
CREATE UNIQUE INDEX IF NOT EXISTS link_events_uuid_idx ON link_events (uuid);
ALTER TABLE link_members ADD COLUMN IF NOT EXISTS chat_context boolean NOT NULL DEFAULT false;
ALTER TABLE link_members ADD COLUMN IF NOT EXISTS handoff text;

INSERT INTO exai_schema_version (id, version) VALUES (1, 4)
ON CONFLICT (id) DO UPDATE SET version = GREATEST(exai_schema_version.version, EXCLUDED.version),
                               applied_at = now();

-- Version 5 (a group task's event through its audit row): a group task change's audit row
-- names the link group and the session that made the change, in the change's own statement;
-- its link event (uuid = the audit row's id) is stored after the call answered (through the
-- instance's spool), or by the outbox relay for a change whose event never got there (its
-- instance died first): common/links.py `outbox_relay`, which finds them by this index.
ALTER TABLE task_events ADD COLUMN IF NOT EXISTS link_group text;
ALTER TABLE task_events ADD COLUMN IF NOT EXISTS link_sender text;
CREATE INDEX IF NOT EXISTS task_events_link_outbox_idx ON task_events (created_at)
    WHERE link_group IS NOT NULL;

INSERT INTO exai_schema_version (id, version) VALUES (1, 5)
ON CONFLICT (id) DO UPDATE SET version = GREATEST(exai_schema_version.version, EXCLUDED.version),
                               applied_at = now();
