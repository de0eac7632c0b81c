"""Structured notes per thread or per session, written straight to Postgres.

Notes survive restarts and compaction because they are rows, not prompt text. A chat reads
them through a Redis copy per scope (`for_prompt`, instance/storage/notes_cache.py); every
write here tells that copy once it committed, before it returns. Bodies have a
size limit (EXAI_NOTE_MAX_BYTES, counted in UTF-8 bytes) so that injecting them into a prompt
stays within budget. A write may carry `expected_version` for optimistic locking, like tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import asyncpg

from common.errors import InvalidArgument, NoteNotFound, NoteTooLarge, VersionConflict
from instance.storage.models import Note
from instance.storage.pool import Database
from instance.storage.validation import check_text, new_id

if TYPE_CHECKING:
    from instance.storage.notes_cache import NotesCache

KEY_MAX = 200
KIND_MAX = 50
SCOPES = ("thread", "session")
_COLS = (
    "id, scope, scope_id, key, body, kind, importance, version, created_at, updated_at, source, source_turn"
)


def _check_scope(scope: Any, scope_id: Any) -> None:
    if scope not in SCOPES:
        raise InvalidArgument(f"scope must be 'thread' or 'session', got {scope!r}")
    check_text(scope_id, "scope_id", min_len=1, max_len=200)


def _check_key(key: Any) -> None:
    check_text(key, "key", min_len=1, max_len=KEY_MAX)


class NoteStore:
    """Create, update, delete and list notes; raises StorageUnavailable when Postgres is down."""

    def __init__(self, db: Database, *, max_bytes: int, cache: NotesCache | None = None) -> None:
        self._db = db
        self._max_bytes = max_bytes
        self.cache = cache

    async def _written(self, scope: str, scope_id: str) -> None:
        if self.cache is not None:
            await self.cache.written(scope, scope_id)

    async def for_prompt(self, scopes: Sequence[tuple[str, str]]) -> list[list[Note]]:
        """The notes of each (scope, scope_id), as `list` orders them, served from the Redis copy
        when there is one (see instance/storage/notes_cache.py); StorageUnavailable when a scope
        has no copy and Postgres cannot be read."""
        for scope, scope_id in scopes:
            _check_scope(scope, scope_id)
        if self.cache is None:
            return [await self.list(scope=s, scope_id=i) for s, i in scopes]
        return await self.cache.lists(scopes)

    async def write(
        self,
        *,
        scope: str,
        scope_id: str,
        key: str,
        body: str,
        kind: str = "note",
        importance: int = 0,
        expected_version: int | None = None,
    ) -> Note:
        """Create or replace the note at (scope, scope_id, key).

        With `expected_version` the write succeeds only if the note is at that version
        (0 means "must not exist yet"); otherwise it raises VersionConflict naming the current one.
        """
        _check_scope(scope, scope_id)
        _check_key(key)
        check_text(body, "body")
        check_text(kind, "kind", min_len=1, max_len=KIND_MAX)
        size = len(body.encode())
        if size > self._max_bytes:
            raise NoteTooLarge(
                f"the note body is {size} bytes; the limit is {self._max_bytes} bytes",
                hint="Shorten the note or split it under several keys (EXAI_NOTE_MAX_BYTES sets the limit).",
                size=size,
                limit=self._max_bytes,
            )
        if isinstance(importance, bool) or not isinstance(importance, int) or not -100 <= importance <= 100:
            raise InvalidArgument(f"importance must be an integer from -100 to 100, got {importance!r}")
        if expected_version is not None and (
            isinstance(expected_version, bool)
            or not isinstance(expected_version, int)
            or expected_version < 0
        ):
            raise InvalidArgument(
                f"expected_version must be a non-negative integer, got {expected_version!r}"
            )
        note_id = new_id()

        async def op(conn: asyncpg.Connection) -> Note:
            if expected_version is None:
                row = await conn.fetchrow(
                    f"""INSERT INTO notes (id, scope, scope_id, key, body, kind, importance)
                        VALUES ($1, $2, $3, $4, $5, $6, $7)
                        ON CONFLICT (scope, scope_id, key) DO UPDATE SET
                            body = EXCLUDED.body, kind = EXCLUDED.kind, importance = EXCLUDED.importance,
                            version = notes.version + 1, updated_at = now(),
                            source = 'manual', source_turn = NULL
                        RETURNING {_COLS}""",
                    note_id, scope, scope_id, key, body, kind, importance,
                )  # fmt: skip
                assert row is not None
                return Note.from_row(row)
            if expected_version == 0:
                row = await conn.fetchrow(
                    f"""INSERT INTO notes (id, scope, scope_id, key, body, kind, importance)
                        VALUES ($1, $2, $3, $4, $5, $6, $7)
                        ON CONFLICT (scope, scope_id, key) DO NOTHING RETURNING {_COLS}""",
                    note_id, scope, scope_id, key, body, kind, importance,
                )  # fmt: skip
            else:
                row = await conn.fetchrow(
                    f"""UPDATE notes SET body = $4, kind = $5, importance = $6, version = version + 1,
                            updated_at = now(), source = 'manual', source_turn = NULL
                        WHERE scope = $1 AND scope_id = $2 AND key = $3 AND version = $7
                        RETURNING {_COLS}""",
                    scope, scope_id, key, body, kind, importance, expected_version,
                )  # fmt: skip
            if row is not None:
                return Note.from_row(row)
            current = await conn.fetchval(
                "SELECT version FROM notes WHERE scope = $1 AND scope_id = $2 AND key = $3",
                scope,
                scope_id,
                key,
            )
            if current is None:
                raise NoteNotFound(
                    f"no {scope} note {key!r} exists for {scope_id}",
                    hint="Write it without expected_version (or with expected_version=0) to create it.",
                )
            raise VersionConflict(
                f"the {scope} note {key!r} is at version {current}, not {expected_version}",
                hint="Read the note again and retry with its current version.",
                current_version=current,
            )

        note = await self._db.run(op, what="writing the note")
        await self._written(scope, scope_id)
        return note

    async def capture(
        self,
        *,
        scope: str,
        scope_id: str,
        key: str,
        body: str,
        kind: str,
        importance: int,
        source_turn: str | None,
    ) -> bool:
        """Write a note captured from a turn; True if it was created or its text changed.

        The same text again merges into the existing note (no new version); a different text
        under the same key supersedes it (version + 1, source turn updated). Bodies over the
        size limit are cut rather than refused: capture must never fail a call.
        """
        _check_scope(scope, scope_id)
        _check_key(key)
        check_text(kind, "kind", min_len=1, max_len=KIND_MAX)
        data = body.encode()[: self._max_bytes].decode("utf-8", errors="ignore")
        check_text(data, "body", min_len=1)

        async def op(conn: asyncpg.Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(
                """INSERT INTO notes (id, scope, scope_id, key, body, kind, importance, source, source_turn)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, 'auto', $8)
                   ON CONFLICT (scope, scope_id, key) DO UPDATE SET
                       body = EXCLUDED.body, kind = EXCLUDED.kind,
                       importance = GREATEST(notes.importance, EXCLUDED.importance),
                       source = 'auto', source_turn = EXCLUDED.source_turn,
                       version = notes.version + 1, updated_at = now()
                   WHERE notes.body IS DISTINCT FROM EXCLUDED.body
                   RETURNING version""",
                new_id(), scope, scope_id, key, data, kind, importance, source_turn,
            )  # fmt: skip

        changed = await self._db.run(op, what="capturing a note") is not None
        if changed:
            await self._written(scope, scope_id)
        return changed

    async def read(self, *, scope: str, scope_id: str, key: str) -> Note:
        _check_scope(scope, scope_id)
        _check_key(key)

        async def op(conn: asyncpg.Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(
                f"SELECT {_COLS} FROM notes WHERE scope = $1 AND scope_id = $2 AND key = $3",
                scope,
                scope_id,
                key,
            )

        row = await self._db.run(op, what="reading the note")
        if row is None:
            raise NoteNotFound(f"no {scope} note {key!r} exists for {scope_id}")
        return Note.from_row(row)

    async def list(self, *, scope: str, scope_id: str) -> list[Note]:
        """All notes of the scope, most important first, then most recently updated."""
        _check_scope(scope, scope_id)

        async def op(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            return await conn.fetch(  # type: ignore[no-any-return]
                f"SELECT {_COLS} FROM notes WHERE scope = $1 AND scope_id = $2"
                " ORDER BY importance DESC, updated_at DESC, key",
                scope,
                scope_id,
            )

        return [Note.from_row(r) for r in await self._db.run(op, what="listing notes")]

    async def delete(self, *, scope: str, scope_id: str, key: str) -> bool:
        """True if a note was deleted, False if there was none (deleting twice is harmless)."""
        _check_scope(scope, scope_id)
        _check_key(key)

        async def op(conn: asyncpg.Connection) -> str:
            return await conn.execute(  # type: ignore[no-any-return]
                "DELETE FROM notes WHERE scope = $1 AND scope_id = $2 AND key = $3", scope, scope_id, key
            )

        status = await self._db.run(op, what="deleting the note")
        deleted = status.endswith(" 1")
        if deleted:
            await self._written(scope, scope_id)
        return deleted
