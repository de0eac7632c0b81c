"""Reading the files a tool call names, only from the allowed roots, off the event loop.

Also the file tools an agent calls directly (`file_outline`, `file_read`), built on
`instance/context/disclosure.py`, which is what `chat` uses for its `files`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer
from pydantic import Field

from common.errors import InvalidArgument
from instance.runtime import Runtime
from instance.tools import exai_tool
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


def register(mcp: MCPServer[Any], runtime: Runtime) -> None:
    """`file_outline` and `file_read`: progressive disclosure for the calling agent itself."""
    from instance.context import disclosure
    from instance.context.outline import line_count, outline

    roots = runtime.settings.allowed_file_roots

    @exai_tool(
        mcp,
        runtime,
        description="Outline of a file under the allowed roots: classes, functions, methods, constants "
        "(headings for Markdown) with line ranges and signatures, and the file's sha256.",
    )
    async def file_outline(
        path: Annotated[str, Field(min_length=1, description="Absolute path under EXAI_ALLOWED_ROOTS.")],
    ) -> dict[str, Any]:
        check_path(path)

        def work() -> dict[str, Any]:
            f = disclosure.read_checked(path, roots)
            o = outline(f.path, f.text)
            return {"status": "success", "path": f.path, "sha256": f.sha256, "bytes": len(f.data),
                    **o.to_dict(), "outline": o.render()}  # fmt: skip

        return await asyncio.to_thread(work)

    @exai_tool(
        mcp,
        runtime,
        description="Exact lines of a file under the allowed roots (1-based, inclusive), byte for byte, "
        "with the file's sha256 so a later call can tell whether it changed.",
    )
    async def file_read(
        path: Annotated[str, Field(min_length=1, description="Absolute path under EXAI_ALLOWED_ROOTS.")],
        start_line: Annotated[int, Field(ge=1, description="First line, 1-based.")] = 1,
        end_line: Annotated[
            int | None, Field(ge=1, description="Last line, inclusive; default: end.")
        ] = None,
    ) -> dict[str, Any]:
        check_path(path)

        def work() -> dict[str, Any]:
            f = disclosure.read_checked(path, roots)
            total = line_count(f.text)
            end = total if end_line is None else min(end_line, total)
            if start_line > max(total, 1) or (end_line is not None and end_line < start_line):
                raise InvalidArgument(f"lines {start_line}-{end_line} are not in {path!r} ({total} lines)")
            chunk = disclosure.line_slice(f.data, start_line, end)
            return {"status": "success", "path": f.path, "sha256": f.sha256, "total_lines": total,
                    "lines": [start_line, end], "text": chunk.decode("utf-8", errors="replace")}  # fmt: skip

        return await asyncio.to_thread(work)
