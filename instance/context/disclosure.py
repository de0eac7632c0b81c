"""Progressive file disclosure: outlines first, exact line ranges on request, each file once per thread.

A tool that takes files calls `disclose(history, specs, roots=..., model=...)` with the thread's
stored turns and the caller's file specs (`"/abs/path.py"` or `"/abs/path.py:10-40"`, or a
mapping `{"path": ..., "start_line": 10, "end_line": 40}`). What it returns:

- `block`: text to append to the new user turn. A file the thread has not seen in this version
  (by SHA-256 of its bytes) goes in as an outline (or whole, when it is small); a requested
  line range goes in byte-exact; a file the thread already holds unchanged is only referred to.
- `entries`: the per-thread ledger rows for this turn. The caller stores them in the user
  turn's metadata (`metadata["disclosed"]`) together with the turn's content, so the ledger
  travels with the thread to any instance and survives restarts.
- `history_messages(records, disclosure)` renders the stored turns for the prompt. A block
  whose file has changed since (a newer hash in a later turn or in this call) is replaced by a
  one-line marker, so only the newest copy of a file stays in the prompt.

All file access resolves the path, requires it under one of the allowed roots (so `..` and
symlinks cannot leave a root), opens it with O_NOFOLLOW and checks the opened descriptor's real
path again, enforces size limits, and runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import InvalidArgument
from instance.context.outline import line_count, outline
from instance.context.tokens import count_tokens

MAX_FILE_BYTES = 256 * 1024
MAX_TOTAL_BYTES = 1024 * 1024
DEFAULT_FULL_BELOW_TOKENS = 600
"""Files at or under this many tokens are sent whole: their outline would save little."""

OUTLINE_SHARE = 0.08
"""An outline's symbol lines may take this share of the file's tokens; bigger ones get coarser."""

META_KEY = "disclosed"
SHA_SHOWN = 12
"""Hex digits of a file's SHA-256 shown in the prompt (the ledger keeps all 64)."""
_RANGE = re.compile(r"^(?P<path>.+?):(?P<start>\d+)-(?P<end>\d+)$")

FileSpecInput = str | Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class FileSpec:
    """One file a caller named, with an optional 1-based inclusive line range."""

    path: str
    start: int | None = None
    end: int | None = None

    @property
    def ranged(self) -> bool:
        return self.start is not None


def parse_spec(raw: FileSpecInput) -> FileSpec:
    """`"/p.py"`, `"/p.py:10-40"` or `{"path": "/p.py", "start_line": 10, "end_line": 40}`."""
    if isinstance(raw, Mapping):
        path = raw.get("path")
        start, end = raw.get("start_line"), raw.get("end_line")
        if not isinstance(path, str) or not path:
            raise InvalidArgument("a file entry needs a 'path' string")
        if (start is None) != (end is None):
            raise InvalidArgument(f"file {path!r}: give both start_line and end_line, or neither")
        try:
            spec = (
                FileSpec(path, int(start), int(end))
                if start is not None and end is not None
                else FileSpec(path)
            )
        except (TypeError, ValueError):
            raise InvalidArgument(f"file {path!r}: start_line and end_line must be integers") from None
    elif isinstance(raw, str):
        m = _RANGE.match(raw)
        spec = FileSpec(m["path"], int(m["start"]), int(m["end"])) if m else FileSpec(raw)
    else:
        raise InvalidArgument(f"a file entry must be a path string or an object, got {type(raw).__name__}")
    if spec.start is not None and spec.end is not None and not 1 <= spec.start <= spec.end:
        raise InvalidArgument(
            f"file {spec.path!r}: line range {spec.start}-{spec.end} is not valid",
            hint="Lines are 1-based and inclusive: PATH:START-END with START <= END.",
        )
    return spec


# --- safe reading ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileBytes:
    path: str
    data: bytes
    sha256: str

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


def _under(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def read_checked(raw: str, roots: Sequence[Path], *, max_bytes: int = MAX_FILE_BYTES) -> FileBytes:
    """Read one file under the allowed roots (blocking: call it from a worker thread)."""
    if not roots:
        raise InvalidArgument(
            "files were given but no file root is allowed on this server",
            hint="Set EXAI_ALLOWED_ROOTS to the project folders the fleet may read (os.pathsep-separated).",
        )
    resolved_roots = [r.expanduser().resolve() for r in roots]
    allowed = ", ".join(str(r) for r in resolved_roots)
    candidate = Path(raw).expanduser()
    if not candidate.is_absolute():
        raise InvalidArgument(f"file path {raw!r} is not absolute", hint="Pass absolute paths in files.")
    path = candidate.resolve()
    if not _under(path, resolved_roots):
        raise InvalidArgument(
            f"file {raw!r} is outside the allowed roots",
            hint=f"Only files under {allowed} can be read (EXAI_ALLOWED_ROOTS); symlinks and '..' "
            "are followed before the check.",
        )
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InvalidArgument(f"file {raw!r} does not exist or is not a regular file") from None
    except OSError as exc:
        raise InvalidArgument(f"file {raw!r} cannot be opened ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        proc_link = f"/proc/self/fd/{fd}"
        if os.path.exists(proc_link) and not _under(Path(os.readlink(proc_link)), resolved_roots):
            # A path component was swapped for a symlink between the check and the open.
            raise InvalidArgument(f"file {raw!r} is outside the allowed roots", hint=f"Allowed: {allowed}.")
        st = os.fstat(fd)
        if not (st.st_mode & 0o170000) == 0o100000:
            raise InvalidArgument(f"file {raw!r} does not exist or is not a regular file")
        if st.st_size > max_bytes:
            raise InvalidArgument(
                f"file {raw!r} is {st.st_size} bytes, more than the {max_bytes}-byte limit per file",
                hint="Ask for a line range (PATH:START-END) of a smaller file, or quote the part you need.",
            )
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InvalidArgument(f"file {raw!r} grew past the {max_bytes}-byte limit while it was read")
    return FileBytes(str(path), data, hashlib.sha256(data).hexdigest())


def line_slice(data: bytes, start: int, end: int) -> bytes:
    """Lines start..end (1-based, inclusive) exactly as stored, line endings included."""
    lines = data.split(b"\n")
    pieces = [line + b"\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    return b"".join(pieces[start - 1 : end])


# --- the ledger --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """What one turn did with one file: sent a part of it (with its span in the turn), or referred."""

    path: str
    sha256: str
    part: str  # "full" | "outline" | "lines"
    lines: tuple[int, int] | None = None
    span: tuple[int, int] | None = None  # [start, end) in the stored turn's content; None: referred
    tokens: int = 0

    @property
    def opening(self) -> str:
        """The start of this entry's block in the turn, as rendered."""
        extra: dict[str, Any] = {"part": self.part}
        if self.part == "lines" and self.lines is not None:
            extra["lines"] = f"{self.lines[0]}-{self.lines[1]}"
        return f"<file {_attrs(self.path, self.sha256, **extra)}"

    def locate(self, content: str) -> tuple[int, int] | None:
        """Where the block is in `content`: at its recorded span, else found by its opening.

        The search covers a caller that stored the turn with a different prefix (for example
        after stripping echoes) than the one the span was computed against.
        """
        if self.span is None:
            return None
        a, b = self.span
        if 0 <= a < b <= len(content) and content.startswith(self.opening, a):
            return a, b
        i = content.find(self.opening)
        return (i, i + (b - a)) if i >= 0 and i + (b - a) <= len(content) else None

    def covers(self, part: str, lines: tuple[int, int] | None) -> bool:
        if self.span is None:
            return False
        if self.part == "full":
            return True
        if part == "outline":
            return self.part == "outline"
        if part == "lines" and self.part == "lines" and self.lines and lines:
            return self.lines[0] <= lines[0] and lines[1] <= self.lines[1]
        return False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "sha256": self.sha256, "part": self.part}
        if self.lines is not None:
            out["lines"] = list(self.lines)
        if self.span is not None:
            out["span"] = list(self.span)
        out["tokens"] = self.tokens
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LedgerEntry:
        lines, span = d.get("lines"), d.get("span")
        return cls(
            path=str(d["path"]),
            sha256=str(d["sha256"]),
            part=str(d["part"]),
            lines=(int(lines[0]), int(lines[1])) if lines else None,
            span=(int(span[0]), int(span[1])) if span else None,
            tokens=int(d.get("tokens") or 0),
        )


def ledger_of(records: Iterable[Any]) -> list[tuple[int, Any, list[LedgerEntry]]]:
    """(turn index, record, entries) for each stored turn that disclosed or referred to files."""
    out = []
    for i, rec in enumerate(records):
        raw = (getattr(rec, "metadata", None) or {}).get(META_KEY)
        if isinstance(raw, list) and raw:
            out.append((i, rec, [LedgerEntry.from_json(d) for d in raw if isinstance(d, Mapping)]))
    return out


# --- one call's disclosure --------------------------------------------------------------------


@dataclass
class Disclosure:
    """What one call adds: `block` for the user turn, `entries` for its metadata, `report` for the result."""

    block: str = ""
    entries: list[LedgerEntry] = field(default_factory=list)
    report: list[dict[str, Any]] = field(default_factory=list)
    newest: dict[str, str] = field(default_factory=dict)  # path -> sha256 of the newest copy

    @property
    def paths(self) -> list[str]:
        return list(dict.fromkeys(e.path for e in self.entries))

    def metadata(self, prompt_len: int) -> list[dict[str, Any]]:
        """Ledger rows with spans relative to the stored content `prompt + block`."""
        shifted = []
        for e in self.entries:
            span = None if e.span is None else (e.span[0] + prompt_len, e.span[1] + prompt_len)
            shifted.append(LedgerEntry(e.path, e.sha256, e.part, e.lines, span, e.tokens).to_json())
        return shifted


def _attrs(path: str, sha: str, **extra: Any) -> str:
    more = "".join(f' {k}="{v}"' for k, v in extra.items())
    return f'path="{path}" sha256="{sha[:SHA_SHOWN]}"{more}'


def _render_outline(f: FileBytes, *, file_tokens: int, model: str) -> str:
    """The outline block, as detailed as OUTLINE_SHARE of the file's tokens allows."""
    o = outline(f.path, f.text)
    body, detail = o.fit(int(file_tokens * OUTLINE_SHARE), lambda t: count_tokens(t, model))
    extra = {} if detail == "full" else {"detail": detail}
    head = _attrs(f.path, f.sha256, part="outline", lines=o.lines, **extra)
    hint = "(outline: line ranges, then symbol; ask for lines as PATH:START-END)"
    return f"<file {head}>\n{body}\n{hint}\n</file>"


def _render_text(f: FileBytes, part: str, text: str, lines: tuple[int, int] | None) -> str:
    extra: dict[str, Any] = {"part": part}
    if lines is not None:
        extra["lines"] = f"{lines[0]}-{lines[1]}"
    tail = "" if text.endswith("\n") or not text else "\n"
    if tail:
        extra["final_newline"] = "no"
    return f"<file {_attrs(f.path, f.sha256, **extra)}>\n{text}{tail}</file>"


def _render_reference(e: LedgerEntry, turn: int) -> str:
    what = e.part if e.lines is None else f"lines {e.lines[0]}-{e.lines[1]}"
    return f'<file {_attrs(e.path, e.sha256)} unchanged="yes" see="turn {turn}, {what}"/>'


def _plan(
    history: Sequence[Any],
    specs: Sequence[FileSpec],
    files: dict[str, FileBytes],
    *,
    model: str,
    full_below_tokens: int,
) -> Disclosure:
    ledger = ledger_of(history)
    out = Disclosure()
    for _, _, entries in ledger:
        for e in entries:
            out.newest[e.path] = e.sha256
    blocks: list[str] = []
    pos = 2  # the block follows the prompt after "\n\n"
    sent_now: list[LedgerEntry] = []
    for spec in specs:
        f = files[spec.path]
        out.newest[f.path] = f.sha256
        text = f.text
        file_tokens = count_tokens(text, model)
        if spec.ranged:
            assert spec.start is not None and spec.end is not None
            total = line_count(text)
            if spec.start > max(total, 1):
                raise InvalidArgument(
                    f"file {spec.path!r} has {total} lines; line {spec.start} does not exist",
                    hint="Ask for lines within the file (the outline gives each symbol's range).",
                )
            lines: tuple[int, int] | None = (spec.start, min(spec.end, max(total, 1)))
            part = "lines"
        else:
            lines = None
            part = "full" if file_tokens <= full_below_tokens else "outline"
        prior = next(
            (
                (turn, e)
                for turn, _, entries in reversed(ledger)
                for e in entries
                if e.path == f.path and e.sha256 == f.sha256 and e.covers(part, lines)
            ),
            None,
        ) or next(
            (
                (len(history), e)
                for e in sent_now
                if e.path == f.path and e.sha256 == f.sha256 and e.covers(part, lines)
            ),
            None,
        )
        if prior is not None:
            turn, e = prior
            rendered = _render_reference(e, turn + 1)
            entry = LedgerEntry(f.path, f.sha256, part, lines, None, count_tokens(rendered, model))
            status = "referred"
        else:
            if part == "outline":
                rendered = _render_outline(f, file_tokens=file_tokens, model=model)
            elif part == "lines":
                assert lines is not None
                chunk = line_slice(f.data, *lines).decode("utf-8", errors="replace")
                rendered = _render_text(f, part, chunk, lines)
            else:
                rendered = _render_text(f, part, text, None)
            entry = LedgerEntry(f.path, f.sha256, part, lines, (pos, pos + len(rendered)),
                                count_tokens(rendered, model))  # fmt: skip
            sent_now.append(entry)
            status = "sent"
        blocks.append(rendered)
        pos += len(rendered) + 2
        out.entries.append(entry)
        out.report.append(
            {
                "path": f.path,
                "part": part,
                "lines": list(lines) if lines else None,
                "status": status,
                "sha256": f.sha256[:16],
                "tokens": entry.tokens,
                "file_tokens": file_tokens,
            }
        )
    out.block = "\n\n".join(blocks)
    return out


def _read_all(specs: Sequence[FileSpec], roots: Sequence[Path]) -> dict[str, FileBytes]:
    files: dict[str, FileBytes] = {}
    total = 0
    for spec in specs:
        if spec.path in files:
            continue
        f = read_checked(spec.path, roots)
        total += len(f.data)
        if total > MAX_TOTAL_BYTES:
            raise InvalidArgument(f"the files add up to more than {MAX_TOTAL_BYTES} bytes; pass fewer files")
        files[spec.path] = f
    return files


async def disclose(
    history: Sequence[Any],
    raw_specs: Sequence[FileSpecInput],
    *,
    roots: Sequence[Path],
    model: str,
    full_below_tokens: int = DEFAULT_FULL_BELOW_TOKENS,
) -> Disclosure:
    """Plan what of `raw_specs` this turn sends, given the thread's stored turns `history`."""
    if not raw_specs:
        return Disclosure(newest={e.path: e.sha256 for _, _, es in ledger_of(history) for e in es})
    specs = [parse_spec(s) for s in raw_specs]

    def work() -> Disclosure:
        files = _read_all(specs, roots)
        resolved = [FileSpec(files[s.path].path, s.start, s.end) for s in specs]
        by_real = {f.path: f for f in files.values()}
        return _plan(history, resolved, by_real, model=model, full_below_tokens=full_below_tokens)

    return await asyncio.to_thread(work)


def rendered_contents(records: Sequence[Any], disclosure: Disclosure | None = None) -> list[str]:
    """Each stored turn's content as the prompt should carry it (one per record, same order).

    Blocks of files that changed since (a newer hash in a later turn or in `disclosure`) are
    replaced by a one-line marker; everything else is the stored text, byte for byte.
    """
    newest = (
        disclosure.newest
        if disclosure is not None
        else {e.path: e.sha256 for _, _, es in ledger_of(records) for e in es}
    )
    ledger = {id(rec): entries for _, rec, entries in ledger_of(records)}
    out = []
    for rec in records:
        content = rec.content
        for e in sorted(ledger.get(id(rec), []), key=lambda e: -(e.span or (0, 0))[0]):
            if e.span is None or newest.get(e.path, e.sha256) == e.sha256:
                continue
            where = e.locate(content)
            if where is not None:
                a, b = where
                marker = f'<file {_attrs(e.path, e.sha256)} superseded="yes" note="a newer copy follows"/>'
                content = content[:a] + marker + content[b:]
        out.append(content)
    return out


def history_messages(records: Sequence[Any], disclosure: Disclosure | None = None) -> list[dict[str, str]]:
    """The stored turns as prompt messages (`rendered_contents`), tool turns left out."""
    return [
        {"role": rec.role, "content": content}
        for rec, content in zip(records, rendered_contents(records, disclosure), strict=True)
        if rec.role in ("user", "assistant", "system")
    ]
