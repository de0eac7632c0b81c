"""The acknowledgement log: every write the fleet acknowledged, checked against Postgres at the end.

A write counts as acknowledged when its tool call returned without error. The log is kept in
memory and appended to `acks.jsonl` in the run folder at every sample (in a worker thread, off
the event loop), so a crashed run still shows what was promised. At the end, after the fleet
has stopped (instances drain their spools on SIGTERM), `check` looks every entry up in the
fleet's database:

- chat turn: the conversation row, the user message with the exact prompt, and at least as many
  assistant messages in the thread as acknowledged turns;
- task create / update: the task row, at a version at least the acknowledged one;
- note write: the note at its scope and key with the last acknowledged body (a later
  acknowledged delete of the same key removes the expectation).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg


@dataclass
class AckLog:
    path: Path
    entries: list[dict[str, Any]] = field(default_factory=list)
    _saved: int = 0

    def add(self, kind: str, **fields: Any) -> None:
        self.entries.append({"kind": kind, **fields})

    async def save(self) -> None:
        """Append the entries added since the last save to the file."""
        new, self._saved = self.entries[self._saved :], len(self.entries)
        if new:
            text = "".join(json.dumps(e) + "\n" for e in new)
            await asyncio.to_thread(self._append, text)

    def _append(self, text: str) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text)

    def counts(self) -> dict[str, int]:
        return dict(Counter(e["kind"] for e in self.entries))

    def threads(self) -> list[str]:
        return [e["cid"] for e in self.entries if e["kind"] == "chat_turn"]


async def check(log: AckLog, dsn: str) -> dict[str, Any]:
    """{"checked": n, "missing": [descriptions]} for every acknowledged write."""
    conn = await asyncpg.connect(dsn)
    try:
        return await _check(log.entries, conn)
    finally:
        await conn.close()


async def _check(entries: list[dict[str, Any]], conn: asyncpg.Connection) -> dict[str, Any]:
    missing: list[str] = []
    turns = [e for e in entries if e["kind"] == "chat_turn"]
    cids = sorted({e["cid"] for e in turns})
    conv = {
        str(r["id"])
        for r in await conn.fetch("SELECT id FROM conversations WHERE id = ANY($1::uuid[])", cids)
    }
    rows = await conn.fetch(
        "SELECT conversation_id, role, content FROM messages WHERE conversation_id = ANY($1::uuid[])", cids
    )
    user = {(str(r["conversation_id"]), r["content"]) for r in rows if r["role"] == "user"}
    assistant = Counter(str(r["conversation_id"]) for r in rows if r["role"] == "assistant")
    acked_turns = Counter(e["cid"] for e in turns)
    for cid in cids:
        if cid not in conv:
            missing.append(f"conversation {cid} (acknowledged by chat) has no row")
        if assistant[cid] < acked_turns[cid]:
            missing.append(
                f"conversation {cid}: {acked_turns[cid]} turns acknowledged, {assistant[cid]} replies stored"
            )
    for e in turns:
        if (e["cid"], e["prompt"]) not in user:
            missing.append(f"chat turn {e['prompt'][:40]!r} of conversation {e['cid']} is not stored")

    tasks: dict[str, int] = {}
    for e in entries:
        if e["kind"] in ("task_create", "task_update"):
            tasks[e["id"]] = max(tasks.get(e["id"], 0), int(e["version"]))
    found = {
        str(r["id"]): int(r["version"])
        for r in await conn.fetch("SELECT id, version FROM tasks WHERE id = ANY($1::uuid[])", list(tasks))
    }
    for tid, version in tasks.items():
        if tid not in found:
            missing.append(f"task {tid} (acknowledged) has no row")
        elif found[tid] < version:
            missing.append(f"task {tid} is at version {found[tid]}, version {version} was acknowledged")

    notes: dict[tuple[str, str, str], str | None] = {}
    for e in entries:
        if e["kind"] == "note_write":
            notes[(e["scope"], e["scope_id"], e["key"])] = e["body"]
        elif e["kind"] == "note_delete":
            notes[(e["scope"], e["scope_id"], e["key"])] = None
    expected = {k: v for k, v in notes.items() if v is not None}
    scope_ids = sorted({k[1] for k in expected})
    stored = {
        (r["scope"], r["scope_id"], r["key"]): r["body"]
        for r in await conn.fetch(
            "SELECT scope, scope_id, key, body FROM notes WHERE scope_id = ANY($1::text[])", scope_ids
        )
    }
    for k, body in expected.items():
        if k not in stored:
            missing.append(f"note {k[0]}/{k[1]}/{k[2]} (acknowledged) has no row")
        elif stored[k] != body:
            missing.append(f"note {k[0]}/{k[1]}/{k[2]} holds another body than the last acknowledged one")
    return {
        "checked": {"chat_turns": len(turns), "tasks": len(tasks), "notes": len(expected)},
        "missing": missing,
    }
