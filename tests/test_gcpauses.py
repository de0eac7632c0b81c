"""common/gcpauses.py: the collector's pauses, counted per generation."""

from __future__ import annotations

import gc

from common import gcpauses


def test_collections_are_counted_per_generation_and_rendered() -> None:
    gcpauses.install()
    gcpauses.install()  # once per process: a second install adds no second callback
    assert sum(cb is gcpauses._on_collection for cb in gc.callbacks) == 1
    before = gcpauses.summary()["generations"]
    gc.collect(0)
    gc.collect(2)
    after = gcpauses.summary()["generations"]
    assert after[0]["collections"] == before[0]["collections"] + 1
    assert after[2]["collections"] >= before[2]["collections"] + 1
    assert 0 < after[2]["longest_pause_ms"] <= after[2]["pause_ms_total"]
    assert after[2]["pause_ms_total"] > before[2]["pause_ms_total"]
    text = gcpauses.render_metrics()
    assert 'exai_gc_collections_total{generation="2"}' in text
    assert "# TYPE exai_gc_pause_seconds_total counter" in text
    assert text.endswith("\n") and "exai_gc_frozen_objects " in text


def test_the_frozen_count_is_taken_at_freeze_not_per_scrape(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """gc.get_freeze_count walks the whole permanent generation: never on a metrics scrape, and a
    freeze counts only the young generations it moves, so a second freeze adds to the first."""
    walks: list[int] = []
    monkeypatch.setattr(gc, "freeze", lambda: None)  # (the test process itself stays unfrozen)
    monkeypatch.setattr(gc, "get_freeze_count", lambda: walks.append(1) or 0)
    monkeypatch.setattr(gc, "get_objects", lambda generation=None: [None] * (generation + 1) * 1000)
    monkeypatch.setattr(gcpauses, "_frozen", 0)
    gcpauses.freeze()
    assert gcpauses.summary()["frozen_objects"] == 6000  # generations 0, 1, 2: 1000 + 2000 + 3000
    gcpauses.freeze()
    for _ in range(3):
        assert gcpauses.summary()["frozen_objects"] == 12000
        assert "exai_gc_frozen_objects 12000\n" in gcpauses.render_metrics()
    assert walks == []
