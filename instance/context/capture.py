"""Notes captured from a turn where the text says so plainly.

The deterministic extractor reads the user's prompt and the model's answer line by line
(outside code fences) and keeps lines that open with a plain marker:

- decisions (either side): `Decision:`, `Decided:`, `We decided …`, `Agreed:`, `Let's go with …`
- constraints (the user's side only): `Constraint:`, `Requirement:`, `Must …`, `Never …` …
- todos (either side): `TODO:`, `Next step:`, `Action item:`, `- [ ] …`
- errors and their fixes: `Error: …` followed in the same turn by `Fix: …` become one note.

Each captured note gets a key from its kind and subject (`auto-decision-database` for
`Decision: database = Postgres`) or, without a subject, from its normalised text. So the same
statement made twice merges into one note, and a later statement about the same subject
supersedes the earlier one (the note's version goes up). Notes are written in the thread's
scope with the id of the turn they came from.

`EXAI_NOTE_CAPTURE=model` asks the model instead to restate the turn as such marker lines and
runs the same extractor over its answer; `off` disables capture.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any

from instance.providers import ChatRequest
from instance.storage.notes import NoteStore

log = logging.getLogger(__name__)

SUBJECT_MAX = 48
BODY_MAX = 600

_BULLET = re.compile(r"^\s*(?:[-*•+]\s+|\d+[.)]\s+|>\s*)*")
_FENCE = re.compile(r"^\s*(```|~~~)")
_RULES: list[tuple[str, int, bool, re.Pattern[str]]] = [
    # (kind, importance, user only, pattern whose group "body" is the note)
    ("decision", 7, False, re.compile(
        r"^(?:\*\*)?(?:decision|decided|we decided(?: to)?|agreed|let's go with)(?:\*\*)?\s*[:,-]?\s*"
        r"(?P<body>.+)$", re.I)),
    ("constraint", 8, True, re.compile(
        r"^(?:\*\*)?(?:constraint|requirement|must not|must|never|always|do not|don't)(?:\*\*)?\s*:?\s*"
        r"(?P<body>.+)$", re.I)),
    ("todo", 5, False, re.compile(
        r"^(?:\*\*)?(?:todo|to-do|next step|action item)s?(?:\*\*)?\s*[:-]\s*(?P<body>.+)$", re.I)),
    ("todo", 5, False, re.compile(r"^\[ \]\s+(?P<body>.+)$")),
    ("error", 6, False, re.compile(
        r"^(?:\*\*)?(?:error|exception|failure|bug)(?:\*\*)?\s*:\s*(?P<body>.+)$", re.I)),
    ("fix", 6, False, re.compile(
        r"^(?:\*\*)?(?:fix|fixed by|solution|resolved by|workaround)(?:\*\*)?\s*:\s*(?P<body>.+)$", re.I)),
]  # fmt: skip
_KEEP_VERB = re.compile(r"^(must not|must|never|always|do not|don't)\b", re.I)
_SUBJECT = re.compile(rf"^(?P<subject>[^:=→]{{1,{SUBJECT_MAX}}}?)\s*(?:=|:|->|→)\s*\S")


@dataclass(frozen=True, slots=True)
class CapturedNote:
    key: str
    kind: str
    body: str
    importance: int
    source_turn: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "kind": self.kind,
            "importance": self.importance,
            "source_turn": self.source_turn,
        }


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s=:/.-]", " ", text.lower()).split()).strip(" .")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:SUBJECT_MAX]


def _key(kind: str, body: str) -> str:
    m = _SUBJECT.match(body)
    if m and kind in ("decision", "constraint") and _slug(m["subject"]):
        return f"auto-{kind}-{_slug(m['subject'])}"
    return f"auto-{kind}-{hashlib.sha1(_normal(body).encode()).hexdigest()[:12]}"


def _lines(text: str) -> list[str]:
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced and line.strip():
            out.append(_BULLET.sub("", line, count=1).strip())
    return out


def extract(text: str, *, role: str, source_turn: str | None = None) -> list[CapturedNote]:
    """The notes `text` states plainly; `role` is "user" or "assistant" (constraints: user only)."""
    found: dict[str, CapturedNote] = {}
    pending_error: str | None = None
    for line in _lines(text):
        for kind, importance, user_only, pattern in _RULES:
            if user_only and role != "user":
                continue
            m = pattern.match(line)
            if not m:
                continue
            body = line if kind == "constraint" and _KEEP_VERB.match(line) else m["body"]
            body = body.strip().strip("*").strip()[:BODY_MAX]
            if len(body) < 3:
                break
            if kind == "error":
                pending_error = body
                break
            if kind == "fix" and pending_error is not None:
                kind, body, pending_error = "error", f"{pending_error} — fix: {body}", None
            note = CapturedNote(_key(kind, body), kind, body, importance, source_turn)
            found[note.key] = note
            break
    if pending_error is not None:
        note = CapturedNote(_key("error", pending_error), "error", pending_error, 6, source_turn)
        found[note.key] = note
    return list(found.values())


def extract_turn(
    prompt: str, answer: str, *, user_turn: str | None, assistant_turn: str | None
) -> list[CapturedNote]:
    """Notes from one exchange; a statement in the answer wins over the same key in the prompt."""
    merged: dict[str, CapturedNote] = {}
    for note in extract(prompt, role="user", source_turn=user_turn):
        merged[note.key] = note
    for note in extract(answer, role="assistant", source_turn=assistant_turn):
        merged[note.key] = note
    return list(merged.values())


MODEL_PROMPT = (
    "Restate the exchange below as short lines, one per item, each starting with exactly one of "
    "'Decision:', 'Constraint:' (only for what the user required), 'TODO:', 'Error:' or 'Fix:'. "
    "Only what the text states plainly; write NONE if nothing qualifies."
)


async def save(store: NoteStore, thread_id: str, notes: list[CapturedNote]) -> list[str]:
    """Write captured notes into the thread's scope; returns the keys that were created or changed."""
    changed = []
    for n in notes:
        if await store.capture(
            scope="thread",
            scope_id=thread_id,
            key=n.key,
            body=n.body,
            kind=n.kind,
            importance=n.importance,
            source_turn=n.source_turn,
        ):
            changed.append(n.key)
    return changed


async def capture_with_model(
    store: NoteStore,
    provider: Any,
    info: Any,
    thread_id: str,
    prompt: str,
    answer: str,
    user_turn: str,
    answer_turn: str,
) -> list[str]:
    """Model-assisted capture: the model restates the exchange as marker lines, then `extract`.

    The restatement is read as the user's side (so constraints count); notes keep the user's
    turn as their source. A failed call falls back to the deterministic extractor.
    """
    request = ChatRequest(
        model=info,
        messages=[
            {"role": "system", "content": MODEL_PROMPT},
            {"role": "user", "content": f"USER:\n{prompt}\n\nASSISTANT:\n{answer}"},
        ],
        temperature=0.0,
        thinking=False,
    )
    try:
        result = await provider.chat(request)
        found = extract(result.content, role="user", source_turn=user_turn)
    except Exception as exc:  # the answer was already given; capture is best effort
        log.warning("model-assisted note capture failed (%s); using the deterministic extractor", exc)
        found = extract_turn(prompt, answer, user_turn=user_turn, assistant_turn=answer_turn)
    return await save(store, thread_id, found)
