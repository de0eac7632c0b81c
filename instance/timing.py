"""Where a chat call's time goes, stage by stage, so the fleet's own share can be seen and cut.

A call is timed in stages: `reads` (the thread, its notes and the group context, read at once;
each of the three is also timed on its own as `thread_load`, `notes` and `group_context`, so
they overlap), `context` (prompt building and the rest up to the provider's answer, less the
provider), `provider`, `storage_append` and `total`; `fleet` is derived per call as
`total - provider`, the part the fleet itself spends. Each
stage keeps a count, a sum and the most recent RECENT samples for percentiles; the `status`
tool shows the summary and `/internal/metrics` renders it in the Prometheus text format.

    with stages.stage("thread_load"):
        ...
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

RECENT = 512
CHAT_STAGES = (
    "reads",
    "thread_load",
    "notes",
    "group_context",
    "context",
    "provider",
    "storage_append",
    "total",
    "fleet",
)


@dataclass
class Stage:
    count: int = 0
    total: float = 0.0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.recent.append(seconds)

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.recent)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0
        return {
            "count": self.count,
            "mean_ms": round(self.total / self.count * 1000, 3) if self.count else 0.0,
            "p50_ms": round(statistics.median(ordered) * 1000, 3) if ordered else 0.0,
            "p99_ms": round(p99 * 1000, 3),
        }


class Stages:
    """Per-stage timings of one kind of call (here: chat), kept in memory by the instance."""

    def __init__(self, names: tuple[str, ...] = CHAT_STAGES) -> None:
        self.stages = {name: Stage() for name in names}

    def add(self, name: str, seconds: float) -> None:
        self.stages.setdefault(name, Stage()).add(seconds)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def summary(self) -> dict[str, dict[str, Any]]:
        return {name: s.summary() for name, s in self.stages.items()}

    def render(self, metric: str = "exai_instance_chat_stage_seconds") -> str:
        """Prometheus text: a summary per stage (count, sum, p50 and p99 of recent calls)."""
        lines = [
            f"# HELP {metric} Time a chat call spends per stage (fleet = total - provider).",
            f"# TYPE {metric} summary",
        ]
        for name, s in self.stages.items():
            ordered = sorted(s.recent)
            for q in (0.5, 0.99):
                value = ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else 0.0
                lines.append(f'{metric}{{stage="{name}",quantile="{q}"}} {value:.6f}')
            lines.append(f'{metric}_sum{{stage="{name}"}} {s.total:.6f}')
            lines.append(f'{metric}_count{{stage="{name}"}} {s.count}')
        return "\n".join(lines) + "\n"


chat_stages = Stages()
"""The instance's chat timings (one process serves one session at a time: one table suffices)."""
