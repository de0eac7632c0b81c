"""Phase 1 on the way in: text in a new prompt that repeats stored turns is cut out.

Clients re-send history: whole transcripts, quoted answers, role-labelled blocks. Matching is
by content against the thread's stored turns, never by marker strings, so reformatting does not
hide an echo. Both sides are reduced to a sequence of words (letters and digits, case-folded;
every CJK character is its own word): indentation, `>` quote marks, markdown, line endings and
tags vanish from that view, and a re-formatted echo reads the same as a verbatim one.

Matching: every run of `SHINGLE` consecutive words of every stored turn goes into a hash index;
the prompt is scanned left to right, and where a shingle hits, the match is extended word by
word as long as both sides agree. A match shorter than `min_words` (default 20 words, counted
as a reader does: whitespace-separated, a CJK character each; EXAI_CONTEXT_STRIP_MIN_WORDS) is never
stripped: a short quote is the user's own point, and code, logs or documents the thread has
not seen cannot match at all. Ellipsis-truncated echoes
match on the part that is there.

What is cut: the span of matched words plus the decoration that belonged to it (a role label or
heading line in front, an XML-ish tag around it, quote marks, a trailing ellipsis). Consecutive
cut spans separated only by such labels become one. A span in the middle of new text is
replaced by a short reference (`[repeats turns 3-5]`) so the sentence around it still reads; a
span at the start or end of the prompt (the usual re-sent transcript) is removed outright. Each
cut is recorded (`Strip`): which stored turns it repeated, where it was, how many tokens it had
and a digest of the removed bytes, so `unstrip` can put the referred text back.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

SHINGLE = 6
DEFAULT_MIN_WORDS = 20

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_WORD_RE = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")

# Words a client puts around a re-sent turn: roles, "previous answer", "turn 3" ...
_LABEL_WORDS = frozenset(
    """user assistant human ai system model you me i your my claude glm kimi bot agent exai
    turn turns message messages msg previous earlier prior last above below conversation history
    context transcript quote quoted said wrote writes response reply replied answer answered
    question asked prompt tool output result chat thread log the a an of from in on at begin end
    start original full here is was re your our s previously before earlier recap summary
    copy pasted paste echo verbatim note see""".split()
)
_GLUE_WORDS = frozenset("the a an of from in on at is was here re s i you we my your our".split())
_TAG_RE = re.compile(r"</?[A-Za-z][\w:.-]*(?:\s+[\w:.-]+(?:=(?:\"[^\"]*\"|'[^']*'|[^\s>]+))?)*\s*/?>")
_ELLIPSIS_RE = re.compile(
    r"(?:\.{3,}|…|\[\s*(?:\.{3}|…|truncated|snip|cut|more)\s*\]|\(\s*(?:truncated|cont\.?|continued)\s*\))",
    re.I,
)


class StoredTurn(NamedTuple):
    """A turn as the stripper sees it: its id, its 1-based position in the thread, role, text.

    A named tuple, not a frozen dataclass: one is made per stored turn on every call, and a
    frozen dataclass's __init__ costs three times as much.
    """

    id: str
    index: int  # type: ignore[assignment]  # (shadows tuple.index, which nothing uses)
    role: str
    content: str


@dataclass(frozen=True)
class Strip:
    """One cut: the prompt's characters [start, end) repeated these stored turns."""

    start: int
    end: int
    turn_ids: tuple[str, ...]
    turn_indexes: tuple[int, ...]
    words: int
    tokens: int
    marker: str
    at: int  # where the marker (possibly empty) sits in the stripped text
    sha256: str
    spans: tuple[tuple[str, int, int], ...]  # (turn id, first char, end char) of the referred text

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "turn_ids": list(self.turn_ids),
            "turns": list(self.turn_indexes),
            "words": self.words,
            "tokens": self.tokens,
            "marker": self.marker,
            "at": self.at,
            "sha256": self.sha256,
            "spans": [list(s) for s in self.spans],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Strip:
        return cls(
            start=int(d["start"]),
            end=int(d["end"]),
            turn_ids=tuple(d["turn_ids"]),
            turn_indexes=tuple(int(i) for i in d["turns"]),
            words=int(d["words"]),
            tokens=int(d["tokens"]),
            marker=str(d["marker"]),
            at=int(d["at"]),
            sha256=str(d["sha256"]),
            spans=tuple((str(a), int(b), int(c)) for a, b, c in d["spans"]),
        )


@dataclass(frozen=True)
class StripResult:
    """The prompt with echoes cut out, and what was cut."""

    original: str
    text: str
    strips: tuple[Strip, ...] = field(default=())
    tokens_before: int = 0
    tokens_after: int = 0

    @property
    def tokens_stripped(self) -> int:
        return sum(s.tokens for s in self.strips)

    def report(self) -> dict[str, Any]:
        return {
            "tokens_before": self.tokens_before,
            "tokens_after": self.tokens_after,
            "tokens_stripped": self.tokens_stripped,
            "turns_referred": sorted({i for s in self.strips for i in s.turn_indexes}),
            "cuts": len(self.strips),
        }


@dataclass
class _Words:
    words: list[str]
    starts: list[int]
    ends: list[int]


def _words(text: str) -> _Words:
    w, s, e = [], [], []
    for m in _WORD_RE.finditer(text):
        w.append(m.group().casefold())
        s.append(m.start())
        e.append(m.end())
    return _Words(w, s, e)


Shingles = dict[tuple[str, ...], list[int]]
"""Every run of SHINGLE words of a text -> where it starts (word indexes, ascending)."""

TURN_CACHE_ENTRIES = 256
TURN_CACHE_CHARS = 500_000
"""About 45 bytes of memory per cached character (words, offsets, shingles): ~22 MB at most,
enough for a 20-turn thread of 25k characters per turn."""
_turn_cache: OrderedDict[str, tuple[_Words, Shingles]] = OrderedDict()
_turn_cache_chars = 0
_turn_cache_lock = threading.Lock()


def _turn_view(text: str) -> tuple[_Words, Shingles]:
    """A stored turn's words and shingles, computed once per text: a thread's turns do not
    change, and every call on the thread strips against all of them (an LRU bounded in entries
    and characters; thread-safe, stripping may run on a worker thread). Callers never mutate
    what it returns."""
    global _turn_cache_chars
    with _turn_cache_lock:
        hit = _turn_cache.get(text)
        if hit is not None:
            _turn_cache.move_to_end(text)
            return hit
    words = _words(text)
    shingles: Shingles = {}
    w = words.words
    for j in range(len(w) - SHINGLE + 1):
        shingles.setdefault(tuple(w[j : j + SHINGLE]), []).append(j)
    view = (words, shingles)
    with _turn_cache_lock:
        if text not in _turn_cache:
            _turn_cache[text] = view
            _turn_cache_chars += len(text)
            while _turn_cache and (
                len(_turn_cache) > TURN_CACHE_ENTRIES or _turn_cache_chars > TURN_CACHE_CHARS
            ):
                old, _ = _turn_cache.popitem(last=False)
                _turn_cache_chars -= len(old)
    return view


def view_cached(text: str) -> bool:
    """Whether `_turn_view(text)` is a look-up (the turn was stripped against before)."""
    with _turn_cache_lock:
        return text in _turn_cache


@dataclass
class _Match:
    p0: int  # prompt word range [p0, p1)
    p1: int
    parts: list[tuple[int, int, int]]  # (turn position in list, turn word start, turn word end)


_CJK_RE = re.compile(f"[{_CJK}]")


def _reader_words(text: str) -> int:
    """Words as a reader counts them: whitespace-separated, each CJK character one word."""
    if _CJK_RE.search(text) is None:  # the usual case: one search instead of one per word
        return len(text.split())
    return sum(max(1, len(_CJK_RE.findall(part))) for part in text.split())


def _agree(a: list[str], i: int, b: list[str], j: int) -> int:
    """How many words `a[i:]` and `b[j:]` have in common from their start: compared a block at a
    time (a list comparison runs in C), the block doubling while they agree, then the first
    difference found by halving the last block, so a re-sent turn of a thousand words costs a
    few dozen comparisons rather than a thousand steps of Python."""
    limit = min(len(a) - i, len(b) - j)
    n = 0
    step = 8
    while n < limit:
        k = min(step, limit - n)
        if a[i + n : i + n + k] == b[j + n : j + n + k]:
            n += k
            step *= 2
            continue
        lo, hi = 0, k - 1  # agreed for lo words; the difference is within the first k
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if a[i + n : i + n + mid] == b[j + n : j + n + mid]:
                lo = mid
            else:
                hi = mid - 1
        return n + lo
    return n


def _find_matches(
    text: str, prompt: _Words, turns: list[_Words], min_words: int, shingles: list[Shingles]
) -> list[_Match]:
    pw = prompt.words
    out: list[_Match] = []
    i = 0
    # The prompt's shingles are looked up where the scan stands, turn by turn: a long match is
    # skipped over whole, so a re-sent transcript needs few look-ups.
    while i <= len(pw) - SHINGLE:
        key = tuple(pw[i : i + SHINGLE])
        best: tuple[int, int, int] | None = None  # (length, -t, -j) maximised
        for t, own in enumerate(shingles):
            at = own.get(key)
            if at is None:
                continue
            other = turns[t].words
            for j in at:
                n = SHINGLE + _agree(pw, i + SHINGLE, other, j + SHINGLE)
                if best is None or (n, -t, -j) > best:
                    best = (n, -t, -j)
        if best is None:
            i += 1
            continue
        n, t, j = best[0], -best[1], -best[2]
        # the threshold counts words as a reader does (whitespace-separated), so a quoted log
        # line full of punctuation is not "longer" than it looks
        if n >= min_words and _reader_words(text[prompt.starts[i] : prompt.ends[i + n - 1]]) >= min_words:
            out.append(_Match(i, i + n, [(t, j, j + n)]))
            i += n
        else:
            i += 1
    return out


def _with_short_turns(text: str, pw: _Words, turns: list[_Words], matches: list[_Match]) -> list[_Match]:
    """Add whole stored turns too short for the threshold that sit inside a re-sent transcript.

    A short turn ("Thanks, that works.") is only cut when all of it is there, nothing but
    labels or whitespace separates it from a cut of the normal kind, and it is inside the
    pasted history (a cut follows it, or it ends the prompt): then it is part of the same
    transcript, not a quote the user chose or the start of the new question.
    """
    if not matches:
        return matches
    found = list(matches)
    taken = [(m.p0, m.p1) for m in matches]
    # where the prompt has the first word of a short turn (only those words are looked up)
    firsts = {tw.words[0] for tw in turns if 3 <= len(tw.words) < SHINGLE * 4}
    if not firsts:
        return found
    positions: dict[str, list[int]] = {}
    for i, w in enumerate(pw.words):
        if w in firsts:
            positions.setdefault(w, []).append(i)
    for t, tw in enumerate(turns):
        n = len(tw.words)
        if n < 3 or n >= SHINGLE * 4:
            continue
        for i in positions.get(tw.words[0], []):
            if pw.words[i : i + n] != tw.words:
                continue
            if any(a < i + n and i < b for a, b in taken):
                continue
            s, e = pw.starts[i], pw.ends[i + n - 1]
            # inside the transcript: a cut follows it, or a cut precedes it and the prompt ends
            before_cut = any(a >= i + n and _is_label_text(text[e : pw.starts[a]]) for a, b in taken)
            after_cut = _is_label_text(text[e:]) and any(
                b <= i and _is_label_text(text[pw.ends[b - 1] : s]) for a, b in taken
            )
            near = before_cut or after_cut
            if near:
                found.append(_Match(i, i + n, [(t, 0, n)]))
                taken.append((i, i + n))
                break
    found.sort(key=lambda m: m.p0)
    return found


def _is_label_text(text: str) -> bool:
    """True if `text` is only decoration: role labels, tags, quote marks, headings, ellipses."""
    rest = _ELLIPSIS_RE.sub(" ", _TAG_RE.sub(" ", text))
    words = [w.casefold() for w in _WORD_RE.findall(rest)]
    if len(words) > 8:
        return False
    if words and all(w in _GLUE_WORDS for w in words) and not re.search(r"[:#>|<\[]", text):
        return False  # "The" before a match is the start of the user's sentence, not a label
    return all(w in _LABEL_WORDS or w.isdigit() for w in words)


_TAIL_RE = re.compile(r"(?:[^\n]{0,40}?(?:\.{3,}|…)(?=[^\S\n]*(?:\n|$))|[.!?;:,'\"”’)\]*_`]+)")
_HEAD_RE = re.compile(r"[\"'“‘(\[*_`]+$")


def _expand(text: str, start: int, end: int) -> tuple[int, int]:
    """Grow [start, end) over the decoration around a re-sent turn (same line, then whole lines)."""
    tail = _TAIL_RE.match(text, end)
    if tail:  # closing punctuation, or a word cut short by an ellipsis
        end = tail.end()
    head = _HEAD_RE.search(text, 0, start)
    if head:
        start = head.start()
    line_start = text.rfind("\n", 0, start) + 1
    if _is_label_text(text[line_start:start]):
        start = line_start
        for _ in range(3):  # label-only lines just above
            if start == 0:
                break
            prev = text.rfind("\n", 0, start - 1) + 1
            if _is_label_text(text[prev : start - 1]):
                start = prev
            else:
                break
    line_end = text.find("\n", end)
    line_end = len(text) if line_end < 0 else line_end
    if _is_label_text(text[end:line_end]):
        end = line_end
        for _ in range(3):  # closing tags, "[truncated]" on the lines just below
            if end >= len(text):
                break
            nxt = text.find("\n", end + 1)
            nxt = len(text) if nxt < 0 else nxt
            if _is_label_text(text[end + 1 : nxt]):
                end = nxt
            else:
                break
    return start, end


def _marker(indexes: Sequence[int]) -> str:
    idx = sorted(set(indexes))
    if len(idx) == 1:
        return f"[repeats turn {idx[0]}]"
    if idx == list(range(idx[0], idx[-1] + 1)):
        return f"[repeats turns {idx[0]}-{idx[-1]}]"
    return "[repeats turns " + ", ".join(str(i) for i in idx) + "]"


def strip_echoes(
    prompt: str,
    turns: Sequence[StoredTurn],
    *,
    min_words: int = DEFAULT_MIN_WORDS,
    count: Any = None,
) -> StripResult:
    """Cut the parts of `prompt` that repeat `turns`; `count(text) -> int` gives token counts."""
    counter = count or (lambda s: len(_WORD_RE.findall(s)))
    before = counter(prompt)
    usable = [t for t in turns if t.content]
    if not usable or not prompt.strip():
        return StripResult(prompt, prompt, (), before, before)
    pw = _words(prompt)
    views = [_turn_view(t.content) for t in usable]
    tws = [words for words, _ in views]
    matches = _find_matches(prompt, pw, tws, max(min_words, SHINGLE), [own for _, own in views])
    if not matches:
        return StripResult(prompt, prompt, (), before, before)

    matches = _with_short_turns(prompt, pw, tws, matches)

    # Character regions, grown over their decoration, then merged across label-only gaps.
    regions: list[list[Any]] = []  # [start, end, words, parts]
    for m in matches:
        s, e = _expand(prompt, pw.starts[m.p0], pw.ends[m.p1 - 1])
        if regions and (s <= regions[-1][1] or _is_label_text(prompt[regions[-1][1] : s])):
            last = regions[-1]
            last[1] = max(last[1], e)
            last[2] += m.p1 - m.p0
            last[3].extend(m.parts)
        else:
            regions.append([s, e, m.p1 - m.p0, list(m.parts)])

    # Never leave a prompt with nothing new in it: then it is a question asked again, not an echo.
    remaining = prompt
    for s, e, _, _ in reversed(regions):
        remaining = remaining[:s] + remaining[e:]
    if not _WORD_RE.search(_TAG_RE.sub(" ", remaining)) or _is_label_text(remaining):
        return StripResult(prompt, prompt, (), before, before)

    pieces: list[str] = []
    strips: list[Strip] = []
    cursor = 0
    out_len = 0
    for s, e, nwords, parts in regions:
        head = prompt[cursor:s]
        pieces.append(head)
        out_len += len(head)
        inner = bool(prompt[:s].strip()) and bool(prompt[e:].strip())
        referred = sorted({usable[t].index for t, _, _ in parts})
        marker = _marker(referred) if inner else ""
        if marker:
            sep_l = "" if not head or head[-1].isspace() else " "
            sep_r = "" if e >= len(prompt) or prompt[e].isspace() else " "
            marker = f"{sep_l}{marker}{sep_r}"
        removed = prompt[s:e]
        spans = tuple(
            (usable[t].id, tws[t].starts[a], _punct_end(usable[t].content, tws[t].ends[b - 1]))
            for t, a, b in parts
        )
        strips.append(
            Strip(
                start=s,
                end=e,
                turn_ids=tuple(dict.fromkeys(usable[t].id for t, _, _ in parts)),
                turn_indexes=tuple(referred),
                words=nwords,
                tokens=counter(removed),
                marker=marker,
                at=out_len,
                sha256=hashlib.sha256(removed.encode("utf-8", "surrogatepass")).hexdigest(),
                spans=spans,
            )
        )
        pieces.append(marker)
        out_len += len(marker)
        cursor = e
    pieces.append(prompt[cursor:])
    text = _tidy("".join(pieces))
    return StripResult(prompt, text, tuple(strips), before, counter(text))


def _punct_end(text: str, end: int) -> int:
    m = re.compile(r"[.!?;:,'\"”’)\]]*").match(text, end)
    return m.end() if m else end


def _tidy(text: str) -> str:
    """Collapse the blank lines a cut leaves behind; strip the ends."""
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def unstrip(text: str, strips: Sequence[Strip], turns: Sequence[StoredTurn]) -> str:
    """Put the referred turns' text back where each cut was (the undo of `strip_echoes`).

    The stored turns' own text is restored, not the client's formatting of it (quote marks,
    indentation); `Strip.sha256` still identifies the exact bytes that were removed.
    """
    by_id = {t.id: t for t in turns}
    out = text
    # `at` offsets refer to the untidied text; restore from the last cut backwards.
    for strip in sorted(strips, key=lambda s: s.at, reverse=True):
        restored = "\n\n".join(by_id[tid].content[a:b] for tid, a, b in strip.spans if tid in by_id)
        marker = strip.marker
        if marker and marker.strip() in out:
            pos = out.rfind(marker.strip())
            out = out[:pos] + restored + out[pos + len(marker.strip()) :]
        elif strip.start == 0:
            out = restored + "\n\n" + out
        else:
            out = out + "\n\n" + restored
    return out
