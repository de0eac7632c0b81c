"""Event loop stalls the test fleets' processes logged (common/loopwatch.py), for the run's report.

Every fleet (tests/fleet.py) runs its router and instances with a 50 ms watchdog. When a fleet
stops, its programs' logs are read for the watchdog's warnings; pytest's terminal summary lists
them, one line each, and writes them with their stacks to a file it names (conftest.py). With
EXAI_TEST_STRICT_LOOP=1 a fleet whose processes stalled inside the project's own code also fails
the test that stopped it: off by default, since
a loaded machine can stretch a few milliseconds of ordinary work past any threshold.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from common.loopwatch import BLOCKING_MARKER, STALL_MARKER

STRICT = os.environ.get("EXAI_TEST_STRICT_LOOP", "") not in ("", "0", "false")
TEST_STALL_MS = 50.0
"""The watchdog threshold of the test fleets."""

_HEAD = re.compile(
    re.escape(STALL_MARKER) + r": (?P<who>\S+) did not turn for at least (?P<ms>\d+) ms .*?"
    r"loop thread CPU (?P<cpu>\d+) ms, kind=(?P<kind>\w+)"
)
_AUDIT = re.compile(re.escape(BLOCKING_MARKER) + r" of (?P<who>\S+): (?P<event>\S+) ")
_PROJECT_DIRS = ("/common/", "/router/", "/instance/")
_ENTRIES = ("/router/main.py", "/instance/main.py", "/common/entry.py")  # the bottom of every stack


@dataclass(frozen=True)
class LoggedStall:
    """One stall warning from a program's log."""

    test: str  # the test running when the fleet stopped
    log: str  # the log file's name
    who: str
    ms: int
    cpu_ms: int
    kind: str
    text: str  # the warning and its stack

    @property
    def in_project(self) -> bool:
        """A frame of the stack is the project's own code (not the venv's or the stdlib's)."""
        files = [
            ln
            for ln in self.text.splitlines()
            if ln.lstrip().startswith("File ") and ".venv" not in ln and not any(e in ln for e in _ENTRIES)
        ]
        return any(d in ln for ln in files for d in _PROJECT_DIRS)

    @property
    def place(self) -> str:
        """The frame the stall names: the innermost of the project's own, else of a library's
        (not the standard library's), else the innermost."""
        frames = [ln.strip() for ln in self.text.splitlines() if ln.lstrip().startswith("File ")]
        own = [
            ln
            for ln in frames
            if ".venv" not in ln
            and not any(e in ln for e in _ENTRIES)
            and any(d in ln for d in _PROJECT_DIRS)
        ]
        libs = [ln for ln in frames if "site-packages" in ln]
        return (own or libs or frames or ["(no stack)"])[-1]

    @property
    def real(self) -> bool:
        """Blocking in the project's own code (what strict mode fails on)."""
        return (self.kind in ("cpu", "blocked") or self.kind.startswith("audit:")) and self.in_project


collected: list[LoggedStall] = []
"""Every stall the run's fleets logged, in order."""


def read_stalls(logs: Path, test: str) -> list[LoggedStall]:
    """The stall warnings in a fleet's program logs (router*.log, instance_*.log)."""
    found: list[LoggedStall] = []
    for path in sorted(logs.glob("*.log*")):
        if not path.name.startswith(("router", "instance")):
            continue
        lines = path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            m = _HEAD.search(line) or _AUDIT.search(line)
            if m is None:
                continue
            block = [line[m.start() :]]
            for more in lines[i + 1 :]:
                if not more.startswith(" "):
                    break
                block.append(more)
            found.append(
                LoggedStall(
                    test=test,
                    log=path.name,
                    who=m["who"],
                    ms=int(m["ms"]) if "ms" in m.groupdict() else 0,
                    cpu_ms=int(m["cpu"]) if "cpu" in m.groupdict() else 0,
                    kind=m["kind"] if "kind" in m.groupdict() else f"audit:{m['event']}",
                    text="\n".join(block),
                )
            )
    return found
