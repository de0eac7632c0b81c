"""Reading a git working tree for precommit and codereview, without blocking the event loop.

git runs as a subprocess (`asyncio.create_subprocess_exec`, no shell), only inside a folder
under EXAI_ALLOWED_ROOTS, with a timeout; a cancelled call kills it. Diffs are capped so one
huge change cannot crowd everything else out of the expert's prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import GitFailed, InvalidArgument
from instance.tools.files import allowed_path

GIT_TIMEOUT = 30.0
MAX_DIFF_CHARS = 200_000


@dataclass
class GitChanges:
    """What is pending in a working tree: status and the diff the expert model reads."""

    repository: str
    branch: str
    changed_files: list[str] = field(default_factory=list)
    diffs: dict[str, str] = field(default_factory=dict)
    truncated: bool = False

    def summary(self) -> dict[str, Any]:
        return {
            "repository": self.repository,
            "branch": self.branch,
            "changed_files": self.changed_files,
            "diff_chars": {name: len(text) for name, text in self.diffs.items()},
            "truncated": self.truncated,
        }

    def as_prompt(self) -> str:
        parts = [f"Repository: {self.repository} (branch {self.branch})", "Changed files:"]
        parts += [f"  {line}" for line in self.changed_files] or ["  (none)"]
        for name, text in self.diffs.items():
            parts.append(f"--- {name} ---\n{text or '(empty)'}")
        if self.truncated:
            parts.append(f"(diff cut at {MAX_DIFF_CHARS} characters)")
        return "\n".join(parts)


async def _git(cwd: Path, *args: str) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            "git",
            "-C",
            str(cwd),
            "-c",
            "core.quotepath=false",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise GitFailed("git is not installed on this instance's host") from None
    try:
        async with asyncio.timeout(GIT_TIMEOUT):
            out, err = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise GitFailed(f"`git {' '.join(args)}` did not finish within {GIT_TIMEOUT:.0f}s") from None
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()  # the call was cancelled: do not leave git running
        raise
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip().splitlines()
        raise GitFailed(
            f"`git {' '.join(args)}` failed in {cwd}: {message[-1] if message else proc.returncode}"
        )
    return out.decode(errors="replace")


async def read_changes(
    path: str,
    roots: list[Path],
    *,
    compare_to: str | None = None,
    include_staged: bool = True,
    include_unstaged: bool = True,
) -> GitChanges:
    """Status and diffs of the working tree at `path` (a folder under the allowed roots)."""
    folder = await asyncio.to_thread(allowed_path, path, roots, what="repository")
    if not await asyncio.to_thread(folder.is_dir):
        raise InvalidArgument(
            f"repository path {path!r} is not a folder", hint="Pass the working tree's folder."
        )
    if compare_to is not None and (not compare_to.strip() or compare_to.startswith("-")):
        raise InvalidArgument(
            f"compare_to {compare_to!r} is not a git ref", hint="Name a branch, tag or commit."
        )
    top = (await _git(folder, "rev-parse", "--show-toplevel")).strip()
    branch = (await _git(folder, "rev-parse", "--abbrev-ref", "HEAD")).strip() or "(detached)"
    status = await _git(folder, "status", "--porcelain")
    changes = GitChanges(
        repository=top, branch=branch, changed_files=[ln for ln in status.splitlines() if ln]
    )
    wanted: dict[str, tuple[str, ...]]
    if compare_to is not None:
        wanted = {f"diff against {compare_to}": ("diff", compare_to, "--")}
    else:
        wanted = {}
        if include_staged:
            wanted["staged changes"] = ("diff", "--cached")
        if include_unstaged:
            wanted["unstaged changes"] = ("diff",)
    budget = MAX_DIFF_CHARS
    for name, args in wanted.items():
        text = await _git(folder, *args)
        if len(text) > budget:
            text, changes.truncated = text[:budget], True
        budget -= len(text)
        changes.diffs[name] = text
    return changes
