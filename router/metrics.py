"""Prometheus text exposition, written by hand.

The router needs a few counters, gauges and histograms; a hundred lines here avoid a
dependency and keep observation on the proxy path to a dict lookup and an add.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable

from common import gcpauses, loopwatch

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

Labels = tuple[tuple[str, str], ...]


def _fmt_labels(labels: Labels, extra: tuple[str, str] | None = None) -> str:
    items = [*labels, extra] if extra else list(labels)
    if not items:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in items)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Counter:
    def __init__(self, name: str, doc: str) -> None:
        self.name, self.doc = name, doc
        self.values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items())) if labels else ()
        self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.doc}"
        yield f"# TYPE {self.name} counter"
        for labels, value in sorted(self.values.items()):
            yield f"{self.name}{_fmt_labels(labels)} {_num(value)}"


class Gauge:
    """A gauge whose samples are computed when scraped (sessions, instances); `kind="counter"`
    for a count kept elsewhere (instances add to the link counters in Redis)."""

    def __init__(
        self, name: str, doc: str, collect: Callable[[], dict[Labels, float]], kind: str = "gauge"
    ) -> None:
        self.name, self.doc, self.collect, self.kind = name, doc, collect, kind

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.doc}"
        yield f"# TYPE {self.name} {self.kind}"
        for labels, value in sorted(self.collect().items()):
            yield f"{self.name}{_fmt_labels(labels)} {_num(value)}"


class CollectedSummary:
    """A summary without quantiles whose `_sum` and `_count` are read when scraped."""

    def __init__(self, name: str, doc: str, collect: Callable[[], tuple[float, float]]) -> None:
        self.name, self.doc, self.collect = name, doc, collect

    def render(self) -> Iterable[str]:
        total, count = self.collect()
        yield f"# HELP {self.name} {self.doc}"
        yield f"# TYPE {self.name} summary"
        yield f"{self.name}_sum {_num(total)}"
        yield f"{self.name}_count {_num(count)}"


class Bound:
    """One labelled series of a Histogram, bound once: observing is a bisect and two adds."""

    __slots__ = ("buckets", "series")

    def __init__(self, buckets: tuple[float, ...], series: list[float]) -> None:
        self.buckets, self.series = buckets, series

    def observe(self, value: float) -> None:
        series = self.series
        series[bisect.bisect_left(self.buckets, value)] += 1
        series[-1] += value


class Histogram:
    def __init__(self, name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.name, self.doc, self.buckets = name, doc, buckets
        self.series: dict[Labels, list[float]] = {}  # bucket counts..., +Inf count, sum

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = [0.0] * (len(self.buckets) + 2)
        series[bisect.bisect_left(self.buckets, value)] += 1
        series[-1] += value

    def labelled(self, **labels: str) -> Bound:
        """The series for `labels`, for a caller that observes it often (no per-call label work)."""
        key = tuple(sorted(labels.items()))
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = [0.0] * (len(self.buckets) + 2)
        return Bound(self.buckets, series)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.doc}"
        yield f"# TYPE {self.name} histogram"
        for labels, series in sorted(self.series.items()):
            cumulative = 0.0
            for bound, count in zip((*self.buckets, float("inf")), series[:-1], strict=True):
                cumulative += count
                le = "+Inf" if bound == float("inf") else _num(bound)
                yield f"{self.name}_bucket{_fmt_labels(labels, ('le', le))} {_num(cumulative)}"
            yield f"{self.name}_count{_fmt_labels(labels)} {_num(cumulative)}"
            yield f"{self.name}_sum{_fmt_labels(labels)} {series[-1]!r}"


class Metrics:
    """Every metric the router exports; gauges are wired to live state by the app."""

    def __init__(self) -> None:
        self.request_seconds = Histogram(
            "exai_router_request_seconds",
            "Time to response headers per route and method (proxied streams: until upstream headers).",
        )
        self.upstream_errors = Counter("exai_router_upstream_errors_total", "Failed upstream calls by kind.")
        self.failovers = Counter("exai_router_failovers_total", "Sessions moved to another instance.")
        self.allocation_waits = Counter(
            "exai_router_allocation_waits_total", "Allocations that found no free instance at first."
        )
        self.allocation_failures = Counter(
            "exai_router_allocation_failures_total", "Allocations that gave up (503 to the client)."
        )
        self.allocation_wait_seconds = Histogram(
            "exai_router_allocation_wait_seconds", "Time spent waiting for a free instance.", WAIT_BUCKETS
        )
        self.spares_started = Counter("exai_router_spares_started_total", "Idle instances started on demand.")
        self.sessions_ended = Counter("exai_router_sessions_ended_total", "Sessions ended, by reason.")
        self.sessions_parked = Counter(
            "exai_router_sessions_parked_total", "Sessions that gave their instance back, by reason."
        )
        self.sessions_resumed = Counter(
            "exai_router_sessions_resumed_total", "Parked sessions bound to an instance again."
        )
        self.resume_seconds = Histogram(
            "exai_router_resume_seconds", "Time to bind a parked session again (allocation + replay)."
        )
        self.handovers = Counter(
            "exai_router_handovers_total",
            "Instances handed from a parked idle session straight to a waiting one (no reset between).",
        )
        self.leases_reconciled = Counter(
            "exai_router_leases_reconciled_total",
            "Lease keys restored from the registry (an instance named a live session, Redis had no lease).",
        )
        self.calls_cut = Counter(
            "exai_router_calls_cut_total", "Calls cut because their instance was being stopped."
        )
        self.fast_calls = Counter(
            "exai_router_fast_path_requests_total",
            "POST /mcp requests served on the fast path (without aiohttp's request objects).",
        )
        self.express_calls = Counter(
            "exai_router_express_calls_total",
            "Fast-path calls sent on the express path (no task; router/express.py), those handed "
            "to the proxy's full path after the send included.",
        )
        self.gauges: list[Gauge | CollectedSummary] = []
        self.extra: list[Counter | Histogram] = []  # registered by the parts that own them

    def add(self, metric: Counter | Histogram) -> None:
        self.extra.append(metric)

    def gauge(
        self, name: str, doc: str, collect: Callable[[], dict[Labels, float]], kind: str = "gauge"
    ) -> None:
        self.gauges.append(Gauge(name, doc, collect, kind))

    def summary(self, name: str, doc: str, collect: Callable[[], tuple[float, float]]) -> None:
        self.gauges.append(CollectedSummary(name, doc, collect))

    def render(self) -> str:
        parts: list[Iterable[str]] = [g.render() for g in self.gauges]
        parts += [
            m.render()
            for m in (
                self.request_seconds,
                self.upstream_errors,
                self.failovers,
                self.allocation_waits,
                self.allocation_failures,
                self.allocation_wait_seconds,
                self.spares_started,
                self.sessions_ended,
                self.sessions_parked,
                self.sessions_resumed,
                self.resume_seconds,
                self.handovers,
                self.leases_reconciled,
                self.calls_cut,
                self.fast_calls,
                self.express_calls,
                *self.extra,
            )
        ]
        return (
            "\n".join(line for part in parts for line in part)
            + "\n"
            + loopwatch.render_metrics()
            + gcpauses.render_metrics()
        )
