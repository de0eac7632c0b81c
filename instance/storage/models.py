"""The records the storage layer hands out: plain dataclasses with a JSON-safe `to_dict()`.

MCP tools return these to clients, so `to_dict()` gives ISO timestamps and string UUIDs; the
`from_*` constructors are the one place where database rows and cache JSON become records.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

TaskState = Literal["NOT_STARTED", "IN_PROGRESS", "CANCELLED", "COMPLETE"]
TASK_STATES: tuple[str, ...] = ("NOT_STARTED", "IN_PROGRESS", "CANCELLED", "COMPLETE")
NoteScope = Literal["thread", "session"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


def iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts is not None else None


def parse_ts(value: str | datetime | None) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _json_obj(value: Any, default: Any) -> Any:
    """jsonb arrives from asyncpg as text (no codecs, so PgBouncer mode needs no introspection)."""
    if value is None:
        return default
    if isinstance(value, str):
        return json.loads(value)
    return value


@dataclass(frozen=True, slots=True)
class Message:
    """One turn of a conversation thread."""

    id: str
    continuation_id: str
    seq: int
    role: str
    content: str
    created_at: datetime
    session_id: str | None = None
    tool_name: str | None = None
    model: str | None = None
    files: list[str] = field(default_factory=list)
    tokens_in: int | None = None
    tokens_out: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    pos: int | None = None  # the exchange's position in its thread (None: written before positions)

    def to_dict(self) -> dict[str, Any]:
        return {  # "pos" first: the cache's append script fills it in place (thread_scripts.py)
            "pos": self.pos,
            "id": self.id,
            "continuation_id": self.continuation_id,
            "seq": self.seq,
            "role": self.role,
            "content": self.content,
            "created_at": iso(self.created_at),
            "session_id": self.session_id,
            "tool_name": self.tool_name,
            "model": self.model,
            "files": list(self.files),
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Message:
        """Inverse of `to_dict` (cache entries and spool payloads use that shape)."""
        created = parse_ts(d["created_at"])
        assert created is not None
        return cls(
            id=str(d["id"]),
            continuation_id=str(d["continuation_id"]),
            seq=int(d["seq"]),
            role=str(d["role"]),
            content=str(d["content"]),
            created_at=created,
            session_id=d.get("session_id"),
            tool_name=d.get("tool_name"),
            model=d.get("model"),
            files=list(d.get("files") or []),
            tokens_in=d.get("tokens_in"),
            tokens_out=d.get("tokens_out"),
            metadata=dict(d.get("metadata") or {}),
            pos=None if d.get("pos") is None else int(d["pos"]),
        )

    @classmethod
    def from_row(cls, r: Mapping[str, Any]) -> Message:
        return cls(
            id=str(r["id"]),
            continuation_id=str(r["conversation_id"]),
            seq=int(r["seq"]),
            role=r["role"],
            content=r["content"],
            created_at=r["created_at"],
            session_id=r["session_id"],
            tool_name=r["tool_name"],
            model=r["model"],
            files=list(_json_obj(r["files"], [])),
            tokens_in=r["tokens_in"],
            tokens_out=r["tokens_out"],
            metadata=dict(_json_obj(r["metadata"], {})),
            pos=r.get("pos"),
        )


@dataclass(frozen=True, slots=True)
class Task:
    """A task row; `version` is what an update must carry back (optimistic locking)."""

    id: str
    session_id: str | None
    name: str
    description: str
    state: str
    parent_task_id: str | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    metadata: dict[str, Any]
    version: int

    @property
    def is_global(self) -> bool:
        return self.session_id is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "session_id": self.session_id,
            "scope": "global" if self.session_id is None else "session",
            "name": self.name,
            "description": self.description,
            "state": self.state,
            "parent_task_id": self.parent_task_id,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "completed_at": iso(self.completed_at),
            "metadata": dict(self.metadata),
            "version": self.version,
        }

    @classmethod
    def from_row(cls, r: Mapping[str, Any]) -> Task:
        parent = r["parent_task_id"]
        return cls(
            id=str(r["id"]),
            session_id=r["session_id"],
            name=r["name"],
            description=r["description"],
            state=r["state"],
            parent_task_id=str(parent) if parent is not None else None,
            created_at=r["created_at"],
            updated_at=r["updated_at"],
            completed_at=r["completed_at"],
            metadata=dict(_json_obj(r["metadata"], {})),
            version=int(r["version"]),
        )


@dataclass(slots=True)
class TaskNode:
    """A task with its children, for tree listings."""

    task: Task
    children: list[TaskNode] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = self.task.to_dict()
        out["children"] = [c.to_dict() for c in self.children]
        return out


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One audit row: what changed on a task, from which state to which, at which version."""

    id: str
    task_id: str
    session_id: str | None
    event: str
    from_state: str | None
    to_state: str | None
    version: int
    changes: dict[str, Any]
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "task_id": self.task_id,
            "session_id": self.session_id,
            "event": self.event,
            "from_state": self.from_state,
            "to_state": self.to_state,
            "version": self.version,
            "changes": dict(self.changes),
            "created_at": iso(self.created_at),
        }

    @classmethod
    def from_row(cls, r: Mapping[str, Any]) -> TaskEvent:
        return cls(
            id=str(r["id"]),
            task_id=str(r["task_id"]),
            session_id=r["session_id"],
            event=r["event"],
            from_state=r["from_state"],
            to_state=r["to_state"],
            version=int(r["version"]),
            changes=dict(_json_obj(r["changes"], {})),
            created_at=r["created_at"],
        )


@dataclass(frozen=True, slots=True)
class Note:
    """A structured note attached to a thread or a session."""

    id: str
    scope: str
    scope_id: str
    key: str
    body: str
    kind: str
    importance: int
    version: int
    created_at: datetime
    updated_at: datetime
    source: str = "manual"
    source_turn: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "scope": self.scope,
            "scope_id": self.scope_id,
            "key": self.key,
            "body": self.body,
            "kind": self.kind,
            "importance": self.importance,
            "version": self.version,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "source": self.source,
            "source_turn": self.source_turn,
        }

    @classmethod
    def from_row(cls, r: Mapping[str, Any]) -> Note:
        return cls(
            id=str(r["id"]),
            scope=r["scope"],
            scope_id=r["scope_id"],
            key=r["key"],
            body=r["body"],
            kind=r["kind"],
            importance=int(r["importance"]),
            version=int(r["version"]),
            created_at=r["created_at"],
            updated_at=r["updated_at"],
            source=r.get("source") or "manual",
            source_turn=r.get("source_turn"),
        )
