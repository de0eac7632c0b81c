"""Importance of the pieces of a conversation, from general signals rather than key phrases.

A turn is cut into units: sentences and list items of prose, and bulk blocks (fenced code,
runs of log, stack-trace or code lines, tool output). Bulk is what compaction masks first.
Each prose unit gets a score from signals that hold for any phrasing of the same content:

- specificity: things one could look up or act on — paths, file names, `code`, snake_case or
  CamelCase symbols, CONSTANTS, flags, numbers with units, versions;
- obligation and prohibition (modal verbs, negation, limits), which is how constraints and
  user corrections are worded in any register;
- commitment (first-person future, choice and contrast words), which is how decisions are;
- failure and causation words, which carry errors and their fixes;
- questions, especially the user's;
- who said it: the user's words outrank the assistant's, tool output ranks last;
- rarity within the thread (a term said once is information, a term said in every turn is
  topic) and overlap with what the user is asking now;
- small talk and sign-offs without anything specific are pushed down.

Scores are plain floats computed from the text alone, so the same thread always scores the
same: compaction is deterministic byte for byte.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# --- units ------------------------------------------------------------------------------------

_FENCE_RE = re.compile(r"^(```|~~~)[^\n]*\n.*?^\1[^\n]*$", re.M | re.S)
_BULLET_RE = re.compile(r"^\s*(?:[-*+•]|\d{1,3}[.)])\s+")
# Sentence ends: . ! ? (or CJK ones) then space and something that can start a sentence.
_SENT_END_RE = re.compile(r"(?<=[.!?。！？])[\"')\]]*\s+(?=[\"'(\[`*]*[A-Z0-9\u4e00-\u9fff`])")
_ABBREV_RE = re.compile(r"(?:\b(?:e\.g|i\.e|etc|vs|cf|approx|incl|no|fig|mr|mrs|dr|st)\.)$", re.I)
_LOGLINE_RE = re.compile(
    r"""^\s*(?:
        \d{4}-\d\d-\d\d[T\s]\d\d:\d\d |              # timestamps
        \[?\d\d:\d\d:\d\d |
        (?:DEBUG|INFO|WARN(?:ING)?|ERROR|TRACE|FATAL|CRITICAL)\b |
        at\s+[\w.$<>]+\( |                             # java/js frames
        File\s+"[^"]+",\s+line\s+\d+ |                 # python frames
        Traceback\s |
        \$\s+\S | >>>\s | \#\s*\d+\s |                 # shell, repl
        [+\-]{1,3}\s?\S.*\|\s*\d+ |                    # diffstat
        @@\s |
        [{}\[\]]\s*,?\s*$ |                            # json structure
        "[\w-]+"\s*:\s* |                              # json keys
        (?:def|class|import|from|return|const|let|var|function|fn|pub|func|package|if|for|while)\b.*[:{(;]\s*$
    )""",
    re.X,
)


@dataclass(frozen=True)
class Unit:
    """A piece of one turn: a sentence or list item (`prose`) or a block of code/log/output (`bulk`)."""

    turn: int  # position of the turn in the thread (0-based)
    order: int  # position within the turn
    kind: str  # "prose" | "bulk"
    text: str
    sep: str  # whitespace that followed it in the turn ("\n\n", "\n" or " ")


def _codeish(line: str) -> bool:
    s = line.rstrip()
    if not s.strip():
        return False
    if _LOGLINE_RE.match(s):
        return True
    if s.startswith(("    ", "\t")) and not _BULLET_RE.match(s):
        return True
    symbols = sum(1 for c in s if c in "{}[]()<>=;:/\\|$#@%&*_`'\"")
    letters = sum(1 for c in s if c.isalpha())
    return len(s) >= 12 and symbols > 0.25 * max(letters, 1)


def split_units(text: str, turn: int, role: str) -> list[Unit]:
    """Cut a turn into prose units and bulk blocks, keeping enough to rebuild it in order."""
    out: list[Unit] = []
    if role == "tool":
        return [Unit(turn, 0, "bulk", text, "\n\n")]
    pos = 0
    chunks: list[tuple[str, str]] = []  # (kind, text)
    for m in _FENCE_RE.finditer(text):
        chunks.append(("text", text[pos : m.start()]))
        chunks.append(("bulk", m.group()))
        pos = m.end()
    chunks.append(("text", text[pos:]))
    for kind, chunk in chunks:
        if kind == "bulk":
            out.append(Unit(turn, len(out), "bulk", chunk.strip("\n"), "\n\n"))
        else:
            _split_text(chunk, turn, out)
    return [u for u in out if u.text.strip()]


def _code_run(lines: list[str], i: int) -> int:
    """End of the run of code-like lines starting at `i` (blank lines inside allowed)."""
    j = i
    while j < len(lines) and (
        _codeish(lines[j]) or (not lines[j].strip() and j + 1 < len(lines) and _codeish(lines[j + 1]))
    ):
        j += 1
    return j


def _split_text(chunk: str, turn: int, out: list[Unit]) -> None:
    """Paragraphs become prose units; a run of >= 3 code-like lines inside becomes one bulk unit."""
    lines = chunk.split("\n")
    para: list[str] = []
    i = 0
    while i < len(lines):
        j = _code_run(lines, i)
        if sum(1 for line in lines[i:j] if line.strip()) >= 3:
            if para:
                _prose_units("\n".join(para), turn, out)
                para = []
            out.append(Unit(turn, len(out), "bulk", "\n".join(lines[i:j]).strip("\n"), "\n\n"))
            i = j
            continue
        if lines[i].strip():
            para.append(lines[i])
        elif para:
            _prose_units("\n".join(para), turn, out)
            para = []
        i += 1
    if para:
        _prose_units("\n".join(para), turn, out)


def _prose_units(para: str, turn: int, out: list[Unit]) -> None:
    items: list[str] = []
    for line in para.split("\n"):
        if _BULLET_RE.match(line) or not items or line.lstrip().startswith(("#", "|")):
            items.append(line)
        else:
            items[-1] += "\n" + line
    for k, item in enumerate(items):
        sentences = _sentences(item)
        for n, s in enumerate(sentences):
            last = n == len(sentences) - 1
            sep = " " if not last else ("\n" if k < len(items) - 1 else "\n\n")
            out.append(Unit(turn, len(out), "prose", s, sep))


def _sentences(text: str) -> list[str]:
    parts: list[str] = []
    start = 0
    for m in _SENT_END_RE.finditer(text):
        candidate = text[start : m.start()]
        if _ABBREV_RE.search(candidate.rstrip("\"')]")):
            continue
        parts.append(candidate.strip())
        start = m.end()
    parts.append(text[start:].strip())
    return [p for p in parts if p]


# --- signals ----------------------------------------------------------------------------------

_WORD_RE = re.compile(r"[A-Za-z][A-Za-z'’-]*|\d+")
_NAME_RE = re.compile(r"\b[A-Z][a-z]+[A-Za-z0-9]*\b")
_SPECIFIC_RES = [
    re.compile(r"`[^`\n]{1,80}`"),
    re.compile(r"(?<![\w/])(?:[\w.-]+/)+[\w.-]+"),  # paths
    re.compile(
        r"\b[\w-]+\.(?:py|pyi|js|ts|tsx|jsx|go|rs|java|kt|rb|php|c|h|cc|cpp|hpp|cs|sql|toml|yaml|yml|json|ini|cfg|conf|md|sh|lock|txt|env|proto|html|css)\b"
    ),
    re.compile(r"\b[a-z]+(?:_[a-z0-9]+)+\b"),  # snake_case
    re.compile(r"\b[A-Z][a-z]+(?:[A-Z][a-z0-9]+)+\b"),  # CamelCase
    re.compile(r"\b[a-z]+(?:[A-Z][a-z0-9]+)+\b"),  # camelCase
    re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b"),  # CONSTANT_CASE
    re.compile(r"\b\w+\(\)"),  # call()
    re.compile(r"(?<!\w)--?[a-z][\w-]+"),  # flags
    re.compile(
        r"\b\d+(?:\.\d+)*\s?(?:ms|s|sec|secs|seconds?|minutes?|min|h|hours?|days?|kb|mb|gb|tb|kib|mib|gib|%|x|rps|qps|req/s|tokens?|bytes?|lines?|rows?|connections?|workers?|retries|attempts|px)\b",
        re.I,
    ),
    re.compile(r"\bv?\d+\.\d+(?:\.\d+)*\b"),  # versions, decimals
    re.compile(r"(?<![\w.])\d{2,}(?![\w.])"),  # other multi-digit numbers (ports, codes, ids)
    re.compile(r"\b[A-Z]{2,}-?\d+\b"),  # ticket ids, codes
    re.compile(r"https?://\S+"),
]


def _lex(words: str) -> frozenset[str]:
    return frozenset(words.split())


_OBLIGATION = _lex(
    "must mustn't mustnt never always only require required requires requirement mandatory "
    "cannot can't cant shouldn't shall should need needs needed necessary essential "
    "forbidden forbid prohibited disallow disallowed banned avoid ensure guarantee guaranteed "
    "limit limited cap capped max maximum min minimum least most exceed exceeds within "
    "strictly exactly no-one nobody nothing neither nor without except unless allowed "
    "important critical crucial non-negotiable frozen freeze off-limits policy compliance legal "
    "audit blocked blocks banned pinned locked restricted restriction circumstances"
)
_NEGATION = _lex("not no don't dont doesn't isn't aren't wasn't weren't won't never neither nor nothing none")
_COMMITMENT = _lex(
    "decide decided decision decisions chose choose chosen choice go going went pick picked "
    "opt opted settle settled agree agreed agreement adopt adopted final finally conclusion "
    "conclude concluded plan plans planned commit committed switch switched replace replaced "
    "instead rather prefer preferred adopt drop dropped standardise standardize standardising "
    "we'll we will let's lets approve approved accepted accept reject rejected winner wins "
    "vote voted ship shipping select selected henceforth forward onwards"
)
_CORRECTION = _lex(
    "actually wrong incorrect mistake mistaken typo misread misunderstood correction correct "
    "corrected oops sorry meant mean clarify clarification instead rather revert undo ignore "
    "scratch disregard wait nope restate rephrase"
)
_COMMIT_PHRASE_RE = re.compile(
    r"\b(?:from (?:now|here) on|going forward|for good|once and for all|is the way)\b"
)
_HEDGE = _lex(
    "probably might maybe perhaps could usually generally general typically often sometimes "
    "somewhat roughly seems seem think consider worth overall bit little tend tends arguably"
)
# Capitalised words that are ordinary English at the start of a sentence, not names.
_COMMON_CAPS = _lex(
    "the this that these those it we i you they there here what when where why how if but and so "
    "also let please our my your sure thanks ok okay yes no maybe in on at for with one most some "
    "all any each every a an as once after before since because keep make use check see do does "
    "did is are was were have has had not still just only overall good great nice hmm actually "
    "well right now then whatever nobody everything nothing small who which while though although "
    "given going from after agreed team decision correction fixed root open sorry wait"
)
_FAILURE = _lex(
    "error errors exception exceptions traceback fail fails failed failing failure failures "
    "crash crashes crashed crashing bug bugs broken breaks broke timeout timeouts timed "
    "refused denied panic panicked segfault leak leaks deadlock race regression flaky "
    "hang hangs hung stuck invalid unexpected corrupt corrupted lost missing overflow oom "
    "killed abort aborted warning warnings stacktrace undefined null nil"
)
_CAUSE_FIX = _lex(
    "because cause caused causes root due reason since fix fixed fixes fixing resolve resolved "
    "resolves solution solved workaround patch patched mitigate mitigated turned found "
    "culprit therefore so thus hence bumped raised lowered increase increased decrease decreased"
)
_FILLER_START = re.compile(
    r"^(?:sure|great|thanks|thank you|ok(?:ay)?|got it|happy to|glad|of course|certainly|absolutely|"
    r"hope (?:this|that) helps|let me know|good question|no problem|you're welcome|perfect|nice|cool|"
    r"sounds good|i see|understood|alright|right)\b",
    re.I,
)
_STOP = _lex(
    "the a an and or but if then else of to in on at by for with from as is are was were be been "
    "being this that these those it its it's i you he she we they me my your our their them us "
    "do does did have has had will would can could should may might must not no so than too very "
    "just also there here what which who whom when where why how all any each some such about "
    "into over under again further once more most other only own same both few up down out off "
    "let's lets i'm we're you're it'll we'll i'll"
)


def content_words(text: str) -> list[str]:
    return [w for w in (x.lower() for x in _WORD_RE.findall(text)) if w not in _STOP and len(w) > 2]


@dataclass(frozen=True)
class Scored:
    unit: Unit
    score: float


class Scorer:
    """Scores units of one thread; build it once per thread (it learns term rarity from it)."""

    def __init__(self, turn_texts: Sequence[str], roles: Sequence[str], focus: str = "") -> None:
        self._roles = list(roles)
        df: Counter[str] = Counter()
        for text in turn_texts:
            df.update(set(content_words(text)))
        self._df = df
        self._n = max(1, len(turn_texts))
        self._focus = set(content_words(focus))
        self._first_user = next((i for i, r in enumerate(roles) if r == "user"), -1)

    def score(self, unit: Unit) -> float:
        if unit.kind == "bulk":
            return -1.0
        text = unit.text
        lower = text.lower()
        words = [w.lower() for w in _WORD_RE.findall(text)]
        wset = set(words)
        role = self._roles[unit.turn] if unit.turn < len(self._roles) else "user"
        s = {"user": 1.0, "assistant": 0.7, "system": 0.8}.get(role, 0.1)

        specific = sum(len(r.findall(text)) for r in _SPECIFIC_RES)
        # names: capitalised words that are not ordinary sentence starters (Postgres, Kafka ...)
        specific += sum(1 for w in _NAME_RE.findall(text) if w.lower() not in _COMMON_CAPS)
        s += min(2.0, 0.9 * math.log1p(specific) * 1.3)
        if wset & _OBLIGATION:
            s += 1.0 + 0.2 * min(2, len(wset & _OBLIGATION) - 1)
        if wset & _NEGATION:
            s += 0.4
        if wset & _COMMITMENT or _COMMIT_PHRASE_RE.search(lower):
            s += 0.8
        if wset & _CORRECTION:
            s += 0.9 if role == "user" else 0.4
        if wset & _FAILURE:
            s += 0.8
        if wset & _CAUSE_FIX:
            s += 0.6
        if text.rstrip().endswith("?") or "？" in text:
            s += 1.2 if role == "user" else 0.6
        if re.search(r"(?:^|\s)(?:[<>]=?|≤|≥|==|!=)\s*\d", text):
            s += 0.6
        # rarity: terms this thread mentions in few turns carry information
        cw = content_words(text)
        if cw:
            idf = [math.log((self._n + 1) / (self._df.get(w, 0) + 0.5)) for w in cw]
            s += 0.35 * (sum(idf) / len(idf))
            if self._focus:
                s += 0.8 * len(set(cw) & self._focus) / max(3, len(set(cw)))
        if unit.turn == self._first_user:
            s += 0.5
        if _FILLER_START.match(lower.lstrip("*_# ")) and specific == 0:
            s -= 1.5
        if len(words) < 5 and specific == 0:
            s -= 0.8
        if wset & _HEDGE and specific == 0:
            s -= 0.6
        # terms said in this turn only: new information
        hapax = sum(1 for w in set(cw) if len(w) >= 4 and self._df.get(w, 0) <= 1)
        s += 0.3 * min(3, hapax)
        return round(s, 6)

    def score_all(self, units: Iterable[Unit]) -> list[Scored]:
        return [Scored(u, self.score(u)) for u in units]
