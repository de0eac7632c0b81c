"""Where a chat call's time goes, stage by stage, so the fleet's own share can be seen and cut.

From the request's arrival at the instance to the last byte of its answer, in order:
`sdk_in` (the MCP SDK: body parsing, envelope and header checks, argument validation, up to
our tool wrapper), `wrapper` (the wrapper's bookkeeping: binding, session record, link join),
then the chat tool itself: `reads` (the thread, its notes and the group context, read at once;
each of the three is also timed on its own as `thread_load`, `notes` and `group_context`, so
they overlap), `context` (prompt building and the rest up to the provider's answer, less the
provider), `provider` (the whole provider call as the instance sees it: the HTTP client's own
work and the upstream's time), `storage_append` (the exchange's position in Redis and its
spool commit), `answer` (notes capture and the result dict) and `total` (the tool function,
start to return); then `sdk_out` (the SDK turning the result into the JSON-RPC answer and
writing it). `request` is arrival to last byte, and `fleet` is derived per call as
`request - provider`, the part the instance itself spends (so `sdk_in + wrapper + total -
provider + sdk_out`). Each stage keeps a count, a sum and the most recent RECENT samples for
percentiles; the `status` tool shows the summary and `/internal/metrics` renders it in the
Prometheus text format.

    with stages.stage("thread_load"):
        ...
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

RECENT = 512
CHAT_STAGES = (
    "sdk_in",
    "wrapper",
    "reads",
    "thread_load",
    "notes",
    "group_context",
    "context",
    "provider",
    "storage_append",
    "answer",
    "total",
    "sdk_out",
    "request",
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
        stage = self.stages.get(name)
        if stage is None:
            stage = self.stages[name] = Stage()
        stage.add(seconds)

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


@dataclass
class CallClock:
    """One request's marks, set by the layers it passes through (perf_counter seconds)."""

    arrived: float
    tool: str | None = None  # the tool it called, once the tool wrapper is reached
    entered: float = 0.0  # the tool wrapper started
    started: float = 0.0  # the tool function started (after the wrapper's bookkeeping)
    returned: float = 0.0  # the tool wrapper returned
    provider: float = 0.0  # seconds the tool spent waiting for the provider


current_call: ContextVar[CallClock | None] = ContextVar("exai_call_clock", default=None)
"""The clock of the request being served (set by the instance's outermost middleware; the
SDK runs the tool in tasks started inside that request, which inherit it)."""


def mark_tool(name: str) -> CallClock | None:
    """The tool wrapper is reached: note which tool, and when."""
    clock = current_call.get()
    if clock is not None:
        clock.tool = name
        clock.entered = time.perf_counter()
    return clock


def finish_request(clock: CallClock) -> None:
    """The answer's last byte is written: record the request-level stages of a chat call."""
    if clock.tool != "chat" or not clock.returned:
        return
    now = time.perf_counter()
    chat_stages.add("sdk_in", clock.entered - clock.arrived)
    if clock.started:
        chat_stages.add("wrapper", clock.started - clock.entered)
    chat_stages.add("sdk_out", now - clock.returned)
    chat_stages.add("request", now - clock.arrived)
    chat_stages.add("fleet", max(0.0, now - clock.arrived - clock.provider))
