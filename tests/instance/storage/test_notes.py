"""Notes against real Postgres: create/update/delete/list, versions, size limits."""

from __future__ import annotations

import uuid

import pytest

from common.errors import InvalidArgument, NoteNotFound, NoteTooLarge, VersionConflict
from instance.storage import Storage


async def test_note_crud_and_versions(storage: Storage) -> None:
    scope_id = str(uuid.uuid4())
    a = await storage.notes.write(
        scope="thread", scope_id=scope_id, key="decision", body="use SQLite", importance=5
    )
    b = await storage.notes.write(scope="thread", scope_id=scope_id, key="decision", body="use SQLite WAL")
    assert (a.version, b.version, b.id) == (1, 2, a.id)
    await storage.notes.write(scope="thread", scope_id=scope_id, key="todo", body="bench", importance=9)
    assert [n.key for n in await storage.notes.list(scope="thread", scope_id=scope_id)] == [
        "todo",
        "decision",
    ]
    assert await storage.notes.list(scope="session", scope_id=scope_id) == []

    with pytest.raises(VersionConflict) as info:
        await storage.notes.write(
            scope="thread", scope_id=scope_id, key="decision", body="x", expected_version=1
        )
    assert info.value.details["current_version"] == 2
    c = await storage.notes.write(
        scope="thread", scope_id=scope_id, key="decision", body="y", expected_version=2
    )
    assert (
        c.version == 3
        and (await storage.notes.read(scope="thread", scope_id=scope_id, key="decision")).body == "y"
    )
    with pytest.raises(VersionConflict):
        await storage.notes.write(
            scope="thread", scope_id=scope_id, key="decision", body="z", expected_version=0
        )

    assert await storage.notes.delete(scope="thread", scope_id=scope_id, key="decision") is True
    assert await storage.notes.delete(scope="thread", scope_id=scope_id, key="decision") is False
    with pytest.raises(NoteNotFound):
        await storage.notes.read(scope="thread", scope_id=scope_id, key="decision")


async def test_bad_notes_are_refused_and_change_nothing(storage: Storage) -> None:
    scope_id = "s-" + uuid.uuid4().hex
    await storage.notes.write(scope="session", scope_id=scope_id, key="k", body="original")
    limit = storage.settings.note_max_bytes
    with pytest.raises(NoteTooLarge) as info:
        await storage.notes.write(scope="session", scope_id=scope_id, key="k", body="é" * (limit // 2 + 1))
    assert str(limit) in info.value.message
    for kwargs in (
        {"scope": "galaxy", "key": "k", "body": "x"},
        {"scope": "session", "key": "", "body": "x"},
        {"scope": "session", "key": "k" * 201, "body": "x"},
        {"scope": "session", "key": "k", "body": "x", "importance": "high"},
    ):
        with pytest.raises(InvalidArgument):
            await storage.notes.write(scope_id=scope_id, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(NoteNotFound):
        await storage.notes.write(scope="session", scope_id=scope_id, key="new", body="x", expected_version=3)
    notes = await storage.notes.list(scope="session", scope_id=scope_id)
    assert [(n.key, n.body, n.version) for n in notes] == [("k", "original", 1)]


async def test_captured_notes_merge_supersede_and_become_manual_when_edited(storage: Storage) -> None:
    sid = str(uuid.uuid4())

    async def capture(body: str, turn: str, importance: int = 7) -> bool:
        return await storage.notes.capture(
            scope="thread", scope_id=sid, key="auto-decision-db", body=body, kind="decision",
            importance=importance, source_turn=turn,
        )  # fmt: skip

    assert await capture("db = Postgres", "t1") is True
    assert await capture("db = Postgres", "t2", importance=3) is False  # same text: merged
    note = await storage.notes.read(scope="thread", scope_id=sid, key="auto-decision-db")
    assert (note.version, note.source, note.source_turn, note.importance) == (1, "auto", "t1", 7)
    assert await capture("db = SQLite", "t3") is True  # same subject, new text: supersedes
    note = await storage.notes.read(scope="thread", scope_id=sid, key="auto-decision-db")
    assert (note.body, note.version, note.source_turn) == ("db = SQLite", 2, "t3")
    edited = await storage.notes.write(scope="thread", scope_id=sid, key="auto-decision-db", body="db = both")
    assert (edited.version, edited.source, edited.source_turn) == (3, "manual", None)
    assert await capture("db = both", "t5") is False  # a turn repeating the edit changes nothing
    assert await capture("db = CockroachDB", "t6") is True  # a new statement supersedes the edit
    note = await storage.notes.read(scope="thread", scope_id=sid, key="auto-decision-db")
    assert (note.body, note.version, note.source, note.source_turn) == ("db = CockroachDB", 4, "auto", "t6")
    big = await storage.notes.capture(
        scope="thread", scope_id=sid, key="auto-todo-big", body="é" * 100_000, kind="todo",
        importance=5, source_turn="t4",
    )  # fmt: skip
    assert big is True
    cut = await storage.notes.read(scope="thread", scope_id=sid, key="auto-todo-big")
    assert len(cut.body.encode()) <= storage.settings.note_max_bytes
