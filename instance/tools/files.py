"""Reading the files a tool call names, only from the allowed roots, off the event loop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from common.errors import InvalidArgument
from instance.tools.checks import check_path

MAX_FILE_BYTES = 256 * 1024
MAX_TOTAL_BYTES = 1024 * 1024


@dataclass(frozen=True)
class LoadedFile:
    path: str
    text: str

    def as_prompt(self) -> str:
        return f'<file path="{self.path}">\n{self.text}\n</file>'


def allowed_path(raw: str, roots: list[Path], *, what: str) -> Path:
    """`raw` resolved (symlinks followed), if it is absolute and under one of `roots`; blocking."""
    if not roots:
        raise InvalidArgument(
            f"a {what} path was given but no file root is allowed on this server",
            hint="Set EXAI_ALLOWED_ROOTS to the project folders the fleet may read (os.pathsep-separated).",
        )
    candidate = Path(raw).expanduser()
    if not candidate.is_absolute():
        raise InvalidArgument(
            f"{what} path {raw!r} is not absolute", hint=f"Pass absolute paths for the {what}."
        )
    path = candidate.resolve()
    resolved_roots = [r.expanduser().resolve() for r in roots]
    if not any(path == root or root in path.parents for root in resolved_roots):
        allowed = ", ".join(str(r) for r in resolved_roots)
        raise InvalidArgument(
            f"{what} {raw!r} is outside the allowed roots",
            hint=f"Only paths under {allowed} can be read (EXAI_ALLOWED_ROOTS).",
        )
    return path


def _read_all(paths: list[str], roots: list[Path]) -> list[LoadedFile]:
    if not roots:
        raise InvalidArgument(
            "files were given but no file root is allowed on this server",
            hint="Set EXAI_ALLOWED_ROOTS to the project folders the fleet may read (os.pathsep-separated).",
        )
    out: list[LoadedFile] = []
    total = 0
    seen: set[Path] = set()
    for raw in paths:
        path = allowed_path(raw, roots, what="file")
        if path in seen:
            continue
        seen.add(path)
        if not path.is_file():
            raise InvalidArgument(f"file {raw!r} does not exist or is not a regular file")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise InvalidArgument(
                f"file {raw!r} is {size} bytes, more than the {MAX_FILE_BYTES}-byte limit per file",
                hint="Pass a smaller file or quote the relevant part in the prompt.",
            )
        total += size
        if total > MAX_TOTAL_BYTES:
            raise InvalidArgument(f"the files add up to more than {MAX_TOTAL_BYTES} bytes; pass fewer files")
        out.append(LoadedFile(str(path), path.read_text(encoding="utf-8", errors="replace")))
    return out


async def read_files(paths: list[str], roots: list[Path]) -> list[LoadedFile]:
    """Check and read `paths` in a worker thread: file I/O never runs on the event loop."""
    if not paths:
        return []
    for raw in paths:
        check_path(raw)
    try:
        return await asyncio.to_thread(_read_all, paths, roots)
    except (OSError, ValueError) as exc:  # a name too long, a loop of links, a path the OS refuses
        raise InvalidArgument(
            f"a file in files cannot be read ({type(exc).__name__}: {exc})", hint="Pass readable file paths."
        ) from None
