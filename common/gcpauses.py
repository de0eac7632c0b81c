"""The cyclic garbage collector's pauses in this process, counted per generation.

A collection stops the event loop for as long as it walks the objects of the generations it
collects: a youngest-generation pass costs microseconds, but a full one walks everything that
survived, and an instance's startup leaves ~127,000 objects behind (the tokenizers' vocabularies
among them) that took it 60-100 ms on the development machine. So both processes hand what
startup made to the permanent generation (`gc.freeze`, router/main.py and instance/app.py) and
these metrics show what collections still cost: `exai_gc_collections_total`,
`exai_gc_pause_seconds_total` and `exai_gc_longest_pause_seconds`, per generation, and
`exai_gc_frozen_objects`, in the router's `/metrics` and an instance's `/internal/metrics`
and `status` tool.

`install()` adds one callback to `gc.callbacks` (two calls per collection, about a microsecond);
`freeze()` freezes and counts what it froze.
"""

from __future__ import annotations

import gc
import time
from typing import Any

__all__ = ["freeze", "install", "render_metrics", "summary"]

_GENERATIONS = 3
_count = [0] * _GENERATIONS
_seconds = [0.0] * _GENERATIONS
_longest = [0.0] * _GENERATIONS
_started = 0.0
_frozen = 0  # objects in the permanent generation, counted by `freeze`


def _on_collection(phase: str, info: dict[str, Any]) -> None:
    global _started
    if phase == "start":
        _started = time.perf_counter()
        return
    took = time.perf_counter() - _started
    gen = info.get("generation", 0)
    if 0 <= gen < _GENERATIONS:
        _count[gen] += 1
        _seconds[gen] += took
        if took > _longest[gen]:
            _longest[gen] = took


def freeze() -> None:
    """`gc.freeze()`, counting what it moves. `gc.get_freeze_count` walks the whole permanent
    generation (53 ms once on a loaded machine), so the count is kept here instead: each
    freeze adds the objects of the young generations it moves, which only walks those (the
    second freeze, after the tokenizers load, then does not walk the first one's again)."""
    global _frozen
    moving = sum(len(gc.get_objects(generation=g)) for g in range(_GENERATIONS))
    gc.freeze()
    _frozen += moving


def install() -> None:
    """Start counting (once per process; again is a no-op)."""
    if _on_collection not in gc.callbacks:
        gc.callbacks.append(_on_collection)


def summary() -> dict[str, Any]:
    """What the collector has cost so far, for the `status` tool."""
    return {
        "frozen_objects": _frozen,
        "generations": [
            {
                "collections": _count[g],
                "pause_ms_total": round(_seconds[g] * 1000, 3),
                "longest_pause_ms": round(_longest[g] * 1000, 3),
            }
            for g in range(_GENERATIONS)
        ],
    }


def render_metrics() -> str:
    """The collector's metrics in the Prometheus text format."""
    lines = [
        "# HELP exai_gc_collections_total Cyclic garbage collections, by generation.",
        "# TYPE exai_gc_collections_total counter",
        *(f'exai_gc_collections_total{{generation="{g}"}} {_count[g]}' for g in range(_GENERATIONS)),
        "# HELP exai_gc_pause_seconds_total Time the collections took (the event loop waits meanwhile).",
        "# TYPE exai_gc_pause_seconds_total counter",
        *(f'exai_gc_pause_seconds_total{{generation="{g}"}} {_seconds[g]:.6f}' for g in range(_GENERATIONS)),
        "# HELP exai_gc_longest_pause_seconds Longest collection of each generation.",
        "# TYPE exai_gc_longest_pause_seconds gauge",
        *(
            f'exai_gc_longest_pause_seconds{{generation="{g}"}} {_longest[g]:.6f}'
            for g in range(_GENERATIONS)
        ),
        "# HELP exai_gc_frozen_objects Objects in the permanent generation (startup's, never walked).",
        "# TYPE exai_gc_frozen_objects gauge",
        f"exai_gc_frozen_objects {_frozen}",
    ]
    return "\n".join(lines) + "\n"
