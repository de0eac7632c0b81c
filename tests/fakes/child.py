"""A fake in a child process of its own: started, told its port, stopped.

The benchmarks run fakes that stand for something on another machine (a provider on the
internet, the network to Postgres) in processes of their own, so their work never shares the
benchmark's GIL. The child is `python -m MODULE ARGS...` from the repository's root; its first
line on stdout is a JSON object (its port, at least); closing its stdin tells it to stop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

Child = tuple[subprocess.Popen[bytes], dict[str, Any]]

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def child_process(module: str, *args: str, what: str) -> Iterator[Child]:
    """The running child and its first line; `what` names it in the error if it does not start."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", module, *args]
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()  # before any loop runs: the child's port
        if not line:
            raise RuntimeError(f"{what}'s process did not start (exit {child.wait(5)})")
        yield child, json.loads(line)
    finally:
        if child.stdin is not None:
            child.stdin.close()  # the child's cue to stop
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
