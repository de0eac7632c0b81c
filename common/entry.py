"""Run a console-script entry point so that user errors print one line, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from common.errors import ExaiError


def run_entry(fn: Callable[[], int | None], *, prog: str) -> int:
    try:
        return fn() or 0
    except KeyboardInterrupt:
        return 130
    except ExaiError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # Port in use, permission denied, missing file: the OS message says what to fix.
        print(
            f"{prog}: error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""),
            file=sys.stderr,
        )
        return 2
