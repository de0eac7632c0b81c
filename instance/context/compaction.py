"""Phase 2: fit a thread's history into a token budget, keeping what matters.

1. If the whole history fits, it is sent verbatim (append-only: the provider's prompt cache
   keeps matching the prefix from one call to the next).
2. Otherwise the most recent turns stay verbatim and the older turns are compacted. Stable
   mode first: the boundary moves in steps of `STEP` turns and the older part always gets
   1 - `RECENT_SHARE` of the budget, so consecutive calls share the same compacted message
   (and the provider's prompt cache keeps hitting). When the turns after that boundary would
   take more than `RECENT_SHARE`, exact mode: the last `recent_turns` turns (fewer if they
   alone take more than `RECENT_SHARE`), the older part gets the rest. Then:
   a. bulk — code blocks, logs, stack traces, tool output, long pasted data — is masked first,
      oldest first, each block replaced by a one-line placeholder that says what was there
      (kind, size, its first error line; a model summary when summaries are on);
   b. if that is not enough, the older part is chosen again, best first: sentences by
      importance (see `scoring`), each placeholder valued like a middling sentence; what stays
      is shown in its original order, each gap marked `[…]`;
   c. turns with nothing left are named in one line (`[turns 4-6 omitted: 812 tokens]`).
3. Nothing is ever cut inside a sentence: units are whole sentences, list items or blocks,
   and every omission is marked where it happened.

The function is pure: same turns, budget and settings give the same messages byte for byte.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from instance.context.scoring import Scorer, Unit, split_units

RECENT_SHARE = 0.4
STEP = 6  # turns: how far the compaction boundary moves at a time (stable mode)
PLACEHOLDER_VALUE = 1.5  # what a masked block's one-line placeholder is worth next to a sentence
OMITTED_COST = 6  # tokens an omitted turn adds to the "[turns a-b omitted]" line, roughly
ELISION = "[…]"
HEADER = (
    "[Earlier turns of this thread, compacted to fit the context budget; "
    "the most recent turns follow verbatim.]"
)

_ERRLINE_RE = re.compile(
    r"(?i)\b(?:error|exception|fatal|panic|failed|failure|refused|denied|timeout|traceback)\b"
)


class HistoryTurn(NamedTuple):
    """A stored turn as the builder hands it over.

    A named tuple, not a frozen dataclass: one is made per stored turn on every call, and a
    frozen dataclass's __init__ costs three times as much.
    """

    id: str
    index: int  # type: ignore[assignment]  # 1-based position in the thread (shadows tuple.index)
    role: str
    content: str


@dataclass(frozen=True)
class Compacted:
    messages: list[dict[str, str]]
    tokens_before: int
    tokens_after: int
    turns_total: int
    turns_verbatim: int
    turns_compacted: int = 0
    turns_omitted: int = 0
    blocks_masked: int = 0
    sentences_dropped: int = 0
    summarised: int = 0
    masked: tuple[tuple[str, str], ...] = field(default=())  # (digest, text) of masked blocks

    @property
    def compacted(self) -> bool:
        return self.turns_compacted > 0

    def report(self) -> dict[str, Any]:
        return {
            "tokens_before": self.tokens_before,
            "tokens_after": self.tokens_after,
            "turns_total": self.turns_total,
            "turns_verbatim": self.turns_verbatim,
            "turns_compacted": self.turns_compacted,
            "turns_omitted": self.turns_omitted,
            "blocks_masked": self.blocks_masked,
            "sentences_dropped": self.sentences_dropped,
            "summarised": self.summarised,
        }


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _describe(unit: Unit, tokens: int) -> str:
    text = unit.text
    lines = text.count("\n") + 1
    first = text.lstrip().split("\n", 1)[0]
    if text.startswith(("```", "~~~")):
        lang = first.strip("`~ ").split()[0] if first.strip("`~ ") else ""
        kind = f"{lang} code block" if lang else "code block"
    elif "Traceback" in text or re.search(r"^\s+at\s+\S+\(", text, re.M) or 'File "' in text:
        kind = "stack trace"
    elif re.search(r"^(?:diff --git|@@ |[+-]{3} )", text, re.M):
        kind = "diff"
    elif text.lstrip().startswith(("{", "[")):
        kind = "JSON/data"
    elif re.search(r"\b(?:DEBUG|INFO|WARN|ERROR)\b|\d\d:\d\d:\d\d", text):
        kind = "log"
    else:
        kind = "pasted output"
    return f"{kind}, {lines} line{'s' if lines != 1 else ''}, {tokens} tokens"


def _salient(text: str) -> str:
    for line in text.split("\n"):
        if _ERRLINE_RE.search(line):
            s = line.strip()
            return s if len(s) <= 160 else s[:157].rstrip() + "..."
    return ""


def _placeholder(unit: Unit, tokens: int, turn_index: int, summary: str | None) -> str:
    desc = _describe(unit, tokens)
    out = f"[masked {desc} from turn {turn_index}"
    if summary:
        return out + f"; summary: {summary.strip()}]"
    line = _salient(unit.text)
    if line:
        out += f"; first error line: {line}"
    return out + "]"


def compact(
    turns: Sequence[HistoryTurn],
    budget: int,
    count: Callable[[str], int],
    framing: Callable[[str], int],
    *,
    recent_turns: int = 4,
    focus: str = "",
    summaries: Mapping[str, str] | None = None,
) -> Compacted:
    """History messages within `budget` tokens (content plus each message's template framing)."""
    full = [framing(t.role) + count(t.content) for t in turns]
    before = sum(full)
    verbatim_all = [{"role": t.role, "content": t.content} for t in turns]
    if before <= budget:
        return Compacted(verbatim_all, before, before, len(turns), len(turns))

    n = len(turns)
    # Stable mode: the boundary moves in steps of STEP turns and the older part always gets the
    # same share of the budget, so for several calls in a row the compacted message is the same
    # text and the provider's prompt cache keeps matching it.
    boundary = ((n - min(recent_turns, n)) // STEP) * STEP
    stable_budget = int(budget * (1 - RECENT_SHARE)) - framing("user")
    if boundary > 0 and sum(full[boundary:]) <= budget - int(budget * (1 - RECENT_SHARE)):
        old, recent = list(turns[:boundary]), list(turns[boundary:])
        old_budget = stable_budget
        scorer = Scorer([t.content for t in old], [t.role for t in old])
    else:
        r = min(recent_turns, n)
        while r > 0 and sum(full[n - r :]) > RECENT_SHARE * budget:
            r -= 1
        old, recent = list(turns[: n - r]), list(turns[n - r :])
        old_budget = budget - sum(full[n - r :]) - framing("user")
        scorer = Scorer([t.content for t in turns], [t.role for t in turns], focus)

    units: list[Unit] = []
    for pos, t in enumerate(old):
        units.extend(split_units(t.content, pos, t.role))
    tokens = [count(u.text) for u in units]
    scores = [scorer.score(u) for u in units]
    # A sentence said again adds nothing: only its latest copy keeps its score.
    latest: dict[str, int] = {}
    for k, u in enumerate(units):
        if u.kind == "prose":
            latest[" ".join(u.text.lower().split())] = k
    for k, u in enumerate(units):
        if u.kind == "prose" and latest[" ".join(u.text.lower().split())] != k:
            scores[k] -= 3.0
    summaries = summaries or {}

    masked = [False] * len(units)
    dropped = [False] * len(units)

    def render() -> tuple[str, int, int]:
        """(text, turns with something left, placeholders with a summary)"""
        lines = [HEADER]
        omitted: list[int] = []
        omitted_tokens = 0
        kept_turns = 0
        summarised = 0
        by_turn: dict[int, list[int]] = {}
        for k, u in enumerate(units):
            by_turn.setdefault(u.turn, []).append(k)

        def flush_omitted() -> None:
            nonlocal omitted_tokens
            if omitted:
                a, b = omitted[0], omitted[-1]
                label = f"turn {a}" if a == b else f"turns {a}-{b}"
                lines.append(f"[{label} omitted: {omitted_tokens} tokens]")
                omitted.clear()
                omitted_tokens = 0

        for pos, t in enumerate(old):
            ks = by_turn.get(pos, [])
            if not ks or all(dropped[k] for k in ks):
                omitted.append(t.index)
                omitted_tokens += full[pos]
                continue
            flush_omitted()
            kept_turns += 1
            body: list[str] = []
            gap = False
            for k in ks:
                u = units[k]
                if dropped[k]:
                    gap = True
                    continue
                if gap:
                    body.append(ELISION + " ")
                    gap = False
                if masked[k]:
                    summary = summaries.get(digest(u.text))
                    summarised += 1 if summary else 0
                    body.append(_placeholder(u, tokens[k], t.index, summary) + "\n")
                else:
                    body.append(u.text + u.sep)
            if gap:
                body.append(ELISION)
            lines.append(f"--- turn {t.index} ({t.role}) ---\n" + "".join(body).strip())
        flush_omitted()
        return "\n".join(lines), kept_turns, summarised

    # Running estimate of the rendered size (exact check at the end).
    ph = [
        count(_placeholder(u, tokens[k], old[u.turn].index, summaries.get(digest(u.text)))) + 1
        if u.kind == "bulk"
        else 0
        for k, u in enumerate(units)
    ]
    turn_head = [count(f"--- turn {t.index} ({t.role}) ---\n") + 1 for t in old]
    live = [0] * len(old)
    est = count(HEADER) + 1

    def unit_cost(k: int) -> int:
        return ph[k] if masked[k] else tokens[k] + 1

    def add(k: int) -> None:
        nonlocal est
        t = units[k].turn
        if live[t] == 0:
            est += turn_head[t] - OMITTED_COST
        live[t] += 1
        est += unit_cost(k)

    def remove(k: int) -> None:
        nonlocal est
        t = units[k].turn
        live[t] -= 1
        if live[t] == 0:
            est -= turn_head[t] - OMITTED_COST
        est -= unit_cost(k)

    est += OMITTED_COST * len(old)
    for k in range(len(units)):
        add(k)
    # a. mask bulk, oldest first, until it fits
    for k in range(len(units)):
        if est <= old_budget:
            break
        if units[k].kind == "bulk":
            remove(k)
            masked[k] = True
            add(k)
    # b. still too big: rebuild from nothing, best first. A placeholder competes like a
    #    sentence of middling value (more if it carries an error line); weak prose loses to it.
    value = [
        scores[k] if u.kind == "prose" else PLACEHOLDER_VALUE + (0.8 if _salient(u.text) else 0.0)
        for k, u in enumerate(units)
    ]
    if est > old_budget:
        for k in range(len(units)):
            remove(k)
            dropped[k] = True
        for k in sorted(range(len(units)), key=lambda k: (-value[k], -units[k].turn, units[k].order)):
            tp = units[k].turn
            need = (ph[k] if masked[k] else tokens[k] + 1) + (
                turn_head[tp] - OMITTED_COST if live[tp] == 0 else 0
            )
            if need > old_budget - est:
                continue
            dropped[k] = False
            add(k)
    # c. exact check: drop the least valuable survivors until the rendered text fits
    survivors = sorted(
        (k for k in range(len(units)) if not dropped[k]),
        key=lambda k: (value[k], units[k].turn, units[k].order),
    )
    while survivors and count(render()[0]) > old_budget:
        dropped[survivors.pop(0)] = True

    text, kept_turns, summarised = render()
    n_masked = sum(1 for k in range(len(units)) if masked[k] and not dropped[k])
    n_dropped = sum(1 for k in range(len(units)) if dropped[k] and units[k].kind == "prose")
    messages: list[dict[str, str]] = []
    if old and count(text) <= old_budget:  # a budget too small even for the outline: no history
        messages.append({"role": "user", "content": text})
    elif old:
        kept_turns = 0
    messages.extend({"role": t.role, "content": t.content} for t in recent)
    after = sum(framing(m["role"]) + count(m["content"]) for m in messages)
    masked_blocks = tuple(
        (digest(units[k].text), units[k].text) for k in range(len(units)) if masked[k] and not dropped[k]
    )
    return Compacted(
        messages=messages,
        tokens_before=before,
        tokens_after=after,
        turns_total=len(turns),
        turns_verbatim=len(recent),
        turns_compacted=len(old),
        turns_omitted=len(old) - kept_turns,
        blocks_masked=n_masked,
        sentences_dropped=n_dropped,
        summarised=summarised,
        masked=masked_blocks,
    )
