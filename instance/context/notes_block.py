"""The notes block: a thread's and a session's structured notes, chosen within a token budget.

Notes are chosen most important first, then most recently updated, then by key, and rendered in
that order, so the same notes always give the same bytes. The block goes at the top of the new
user turn, after the stored history: the system prompt and the history before it stay an
unchanged prefix from one call to the next, which is what a provider's prompt cache matches.
A note that does not fit the budget is left out whole (never cut mid-text) and reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from instance.context.tokens import count_tokens
from instance.storage.models import Note
from instance.storage.notes import NoteStore

HEADER = "Notes kept for this conversation (most important first; they may be newer than the turns above):"


@dataclass
class NotesBlock:
    text: str = ""
    included: list[Note] = field(default_factory=list)
    omitted: list[Note] = field(default_factory=list)
    tokens: int = 0

    def report(self) -> list[dict[str, Any]]:
        return [_brief(n) for n in self.included]

    def report_omitted(self) -> list[dict[str, Any]]:
        return [_brief(n) for n in self.omitted]


def _brief(n: Note) -> dict[str, Any]:
    return {"scope": n.scope, "key": n.key, "kind": n.kind, "importance": n.importance, "version": n.version}


def order(notes: Sequence[Note]) -> list[Note]:
    """Importance first, then recency, then scope and key: a total, deterministic order."""
    return sorted(notes, key=lambda n: (-n.importance, -n.updated_at.timestamp(), n.scope, n.key))


def render_note(n: Note) -> str:
    body = " ".join(n.body.split()) if "\n" not in n.body.strip() else n.body.strip().replace("\n", "\n  ")
    return f"- [{n.kind}, {n.scope}] {n.key}: {body}"


def select(notes: Sequence[Note], *, budget_tokens: int, model: str) -> NotesBlock:
    """The notes that fit `budget_tokens`, in order, and the block text that carries them."""
    block = NotesBlock()
    if not notes or budget_tokens <= 0:
        block.omitted = order(notes)
        return block
    lines = []
    used = count_tokens(f"<notes>\n{HEADER}\n</notes>", model)
    for n in order(notes):
        line = render_note(n)
        cost = count_tokens(line, model) + 1
        if used + cost > budget_tokens:
            block.omitted.append(n)
            continue
        used += cost
        lines.append(line)
        block.included.append(n)
    if lines:
        block.text = "<notes>\n" + HEADER + "\n" + "\n".join(lines) + "\n</notes>"
        block.tokens = used
    return block


async def load(store: NoteStore, *, thread_id: str | None, session_id: str | None) -> list[Note]:
    """The notes in scope for a call: the thread's (if continuing one) and the calling session's.

    Served from the Redis copies of the scopes (one round trip); a scope without a copy is read
    from Postgres (both at once: on a slow Postgres the call waits one round trip, not two).
    """
    scopes = [(s, i) for s, i in (("thread", thread_id), ("session", session_id)) if i]
    found = await store.for_prompt(scopes)
    return [note for notes in found for note in notes]
