"""The pure parts of phase 3: what the extractor captures, and how notes are chosen for a budget."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from instance.context import capture, notes_block
from instance.storage.models import Note


def test_only_plain_markers_outside_code_are_captured() -> None:
    text = (
        "Some context first.\n"
        "1. Decision: transport = HTTP\n"
        "* TODO: add a metric for parked sessions\n"
        "```\n"
        "Decision: inside a fence\n"
        "# TODO: a code comment\n"
        "```\n"
        "we might decide later\n"
    )
    found = capture.extract(text, role="assistant", source_turn="t1")
    assert [(n.kind, n.body, n.source_turn) for n in found] == [
        ("decision", "transport = HTTP", "t1"),
        ("todo", "add a metric for parked sessions", "t1"),
    ]


def test_constraints_come_from_the_user_only() -> None:
    text = "Never log API keys.\nConstraint: stay on Python 3.11"
    assert capture.extract(text, role="assistant") == []
    assert [n.body for n in capture.extract(text, role="user")] == [
        "Never log API keys.",
        "stay on Python 3.11",
    ]


def test_same_statement_same_key_and_same_subject_supersedes() -> None:
    a = capture.extract("Decision: Use asyncpg.", role="user")[0]
    b = capture.extract("- decision: use asyncpg", role="assistant")[0]
    assert a.key == b.key
    old = capture.extract("Decision: queue = Redis lists", role="user")[0]
    new = capture.extract("Decision: Queue = Redis streams", role="user")[0]
    assert old.key == new.key == "auto-decision-queue" and new.body == "Queue = Redis streams"


def test_errors_pair_with_the_fix_that_follows() -> None:
    found = capture.extract("Error: flusher stuck\nunrelated\nFix: add a timeout\nError: second", role="user")
    assert [(n.kind, n.body) for n in found] == [
        ("error", "flusher stuck — fix: add a timeout"),
        ("error", "second"),
    ]


def _note(key: str, importance: int, age_s: int, body: str = "x") -> Note:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    ts = now - timedelta(seconds=age_s)
    return Note(key, "thread", "t", key, body, "note", importance, 1, ts, ts)


def test_notes_are_chosen_by_importance_then_recency_within_budget() -> None:
    notes = [_note("old", 5, 100), _note("new", 5, 1), _note("top", 9, 500), _note("big", 7, 1, "y " * 400)]
    block = notes_block.select(notes, budget_tokens=120, model="glm-4.6")
    assert [n.key for n in block.included] == ["top", "new", "old"]  # "big" does not fit, smaller ones do
    assert [n.key for n in block.omitted] == ["big"]
    assert block.text.index("top:") < block.text.index("new:") < block.text.index("old:")
    assert notes_block.select(notes, budget_tokens=120, model="glm-4.6").text == block.text  # stable
    assert notes_block.select(notes, budget_tokens=0, model="glm-4.6").text == ""
