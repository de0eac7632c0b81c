"""The instance's one small asyncpg pool: lazy, bounded in time, and honest about outages.

An instance must start even when Postgres is down, so the pool is created on first use (and
retried on later uses) instead of at startup. Every acquire and every command has a timeout.
A connection that died under us (Postgres restarted, a proxy cut it) is retried once for
operations the caller marks idempotent; after that the caller gets StorageUnavailable, which
says plainly that nothing was changed.

A Postgres that stops answering (packets dropped on the way: a network partition, a hung
server) costs every operation its whole timeout, where a refused connection fails at once.
So the first operation that times out marks Postgres *silent*: until a probe of its own (a
fresh connection and `SELECT 1`, retried with backoff from PROBE_FIRST to PROBE_MAX seconds)
reaches it again, operations fail at once with StorageUnavailable instead of each waiting out
the timeout. A chat then goes on without what only Postgres has (its writes are spooled
anyway) in milliseconds, not after the acquire and command timeouts of a read it can do
without; a tool that needs Postgres says so at once. A refusal does not mark it silent: trying
costs nothing then, and the first try after Postgres is back succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from common.errors import ConfigError, StorageUnavailable
from common.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

PROBE_FIRST = 0.25  # seconds from the first timeout to the first probe of a silent Postgres
PROBE_MAX = 5.0  # longest wait between two probes

# Errors that mean "the connection or the server is gone", as opposed to "your SQL is wrong".
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.exceptions.OperatorInterventionError,  # 57P01 admin shutdown, 57P03 cannot connect now
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,  # "connection is closed", "pool is closing"
    asyncpg.exceptions.InternalClientError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


def is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, CONNECTION_ERRORS)


async def _keep_session_state(conn: asyncpg.Connection) -> None:
    """The pool's reset hook: nothing to undo (see `connect`)."""


class Database:
    """Owns the asyncpg pool of one instance process and runs operations on it.

    `run(fn)` is the only way in: it acquires a connection with a timeout, runs `fn(conn)`, and
    turns connection failures into StorageUnavailable (after one retry when `idempotent`).
    """

    def __init__(self, settings: Settings, *, dsn: str | None = None) -> None:
        dsn = dsn or settings.database_url
        if not dsn:
            raise ConfigError("DATABASE_URL is not set: the storage layer needs a Postgres database")
        self._dsn = dsn
        self._min = settings.db_pool_min
        self._max = settings.db_pool_max
        self._acquire_timeout = settings.db_acquire_timeout
        self._command_timeout = settings.db_command_timeout
        self._pgbouncer = settings.db_pgbouncer
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._last_attempt = 0.0
        self._down_logged = False
        self.last_error: str | None = None
        self._silent_since: float | None = None  # monotonic: since an operation timed out (no probe through)
        self._probe: asyncio.Task[None] | None = None
        self.failed_fast_total = 0  # operations refused at once while Postgres was silent
        self.silences_total = 0

    # --- lifecycle -------------------------------------------------------------------------
    async def connect(self) -> asyncpg.Pool:
        """Create the pool if it does not exist yet; raise StorageUnavailable if Postgres is down."""
        if self._pool is not None:
            return self._pool
        if self._closed:
            raise StorageUnavailable("the storage layer is closed (the instance is shutting down)")
        self._refuse_if_silent("connecting")
        async with self._lock:
            if self._pool is not None:
                return self._pool
            self._refuse_if_silent("connecting")
            self._last_attempt = time.monotonic()
            try:
                async with asyncio.timeout(self._acquire_timeout + 1.0):
                    pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=self._min,
                        max_size=self._max,
                        timeout=self._acquire_timeout,  # connect timeout per connection
                        command_timeout=self._command_timeout,
                        # Transaction-mode poolers (PgBouncer, Supavisor) hand each transaction
                        # to any server connection, so named prepared statements must not be used.
                        statement_cache_size=0 if self._pgbouncer else 100,
                        max_inactive_connection_lifetime=60.0,
                        server_settings={"application_name": "exai-instance"},
                        # asyncpg still rolls back an open transaction on release; this skips only
                        # its reset query (UNLISTEN, RESET ALL, advisory unlock, CLOSE ALL), one
                        # round trip per operation on the answer's path. Nothing here changes
                        # session state: no LISTEN, SET, advisory locks or cursors.
                        reset=_keep_session_state,
                    )
            except ValueError as exc:
                raise ConfigError(f"DATABASE_URL: {exc}") from None
            except (asyncpg.PostgresError, *CONNECTION_ERRORS) as exc:
                self._note_down(exc)
                raise StorageUnavailable(f"cannot connect to Postgres: {_describe(exc)}") from None
            self._pool = pool
            self._note_up()
            return pool

    async def close(self) -> None:
        self._closed = True
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                async with asyncio.timeout(5.0):
                    await pool.close()
            except CONNECTION_ERRORS:
                pool.terminate()

    @property
    def connected(self) -> bool:
        return self._pool is not None and not self._down_logged

    def stats(self) -> dict[str, Any]:
        pool = self._pool
        silence = {"silent": self.silent, "failed_fast_total": self.failed_fast_total}
        if pool is None:
            return {"size": 0, "idle": 0, "max": self._max, "min": self._min, "connected": False, **silence}
        return {
            "size": pool.get_size(),
            "idle": pool.get_idle_size(),
            "max": pool.get_max_size(),
            "min": pool.get_min_size(),
            "connected": not self._down_logged,
            **silence,
        }

    # --- running operations ----------------------------------------------------------------
    async def run(
        self,
        fn: Callable[[asyncpg.Connection], Awaitable[T]],
        *,
        idempotent: bool = True,
        what: str = "the operation",
    ) -> T:
        """Run `fn` on a pooled connection; retry once on a dead connection when idempotent."""
        attempts = 2 if idempotent else 1
        last: BaseException | None = None
        for attempt in range(attempts):
            self._refuse_if_silent(what)
            pool = await self.connect()
            try:
                async with pool.acquire(timeout=self._acquire_timeout) as conn:
                    result = await fn(conn)
            except CONNECTION_ERRORS as exc:
                last = exc
                # A timeout is a Postgres that does not answer: another try would only wait as long.
                if attempt + 1 < attempts and not isinstance(exc, asyncio.TimeoutError):
                    log.info("Postgres connection lost during %s (%s); retrying once", what, _describe(exc))
                    # One dead connection usually means all of them (a Postgres restart, a
                    # failover): replace every idle one, so the retry gets a fresh connection.
                    await pool.expire_connections()
                    continue
                self._note_down(exc)
                raise StorageUnavailable(
                    f"Postgres is unreachable, {what} failed: {_describe(exc)}"
                ) from None
            self._note_up()
            return result
        raise StorageUnavailable(f"Postgres is unreachable, {what} failed: {_describe(last)}")

    @property
    def silent(self) -> bool:
        """Whether operations fail at once because Postgres stopped answering (see the module)."""
        return self._silent_since is not None

    def _refuse_if_silent(self, what: str) -> None:
        since = self._silent_since
        if since is None:
            return
        self.failed_fast_total += 1
        age = time.monotonic() - since
        raise StorageUnavailable(
            f"Postgres has not answered for {f'{age:.0f} s' if age >= 1 else 'under a second'} "
            f"(last error: {self.last_error or 'timed out'}); {what} was not attempted",
            hint="Nothing was changed. Retry in a few seconds: the instance probes Postgres in "
            "the background and uses it again as soon as it answers; check that Postgres "
            "(DATABASE_URL) is reachable from this host.",
        )

    def _note_silent(self) -> None:
        """An operation timed out: fail the next ones at once until a probe reaches Postgres."""
        if self._silent_since is None:
            self._silent_since = time.monotonic()
            self.silences_total += 1
            log.warning(
                "Postgres stopped answering (an operation timed out); operations fail at once "
                "until a probe reaches it again"
            )
        if self._probe is None and not self._closed:
            loop = asyncio.get_running_loop()
            self._probe = loop.create_task(self._probe_until_answered(), name="pg-probe")

    async def _probe_until_answered(self) -> None:
        """While Postgres is silent: a fresh connection and `SELECT 1`, with backoff, until one
        answers; then idle pooled connections (possibly stuck on the dead path) are replaced."""
        delay = PROBE_FIRST
        timeout = min(self._acquire_timeout, 2.0)
        try:
            while not self._closed:
                await asyncio.sleep(delay)
                try:
                    async with asyncio.timeout(timeout + 0.5):
                        conn = await asyncpg.connect(self._dsn, timeout=timeout)
                        try:
                            await conn.execute("SELECT 1")
                        finally:
                            await conn.close(timeout=timeout)
                except (asyncpg.PostgresError, *CONNECTION_ERRORS) as exc:
                    self.last_error = _describe(exc)
                    delay = min(delay * 2, PROBE_MAX)
                    continue
                self._silent_since = None
                if self._pool is not None:
                    await self._pool.expire_connections()
                self._note_up()
                log.warning("Postgres answers again (probe)")
                return
        finally:
            self._probe = None

    def _note_down(self, exc: BaseException) -> None:
        if isinstance(exc, asyncio.TimeoutError):
            self._note_silent()
        self.last_error = _describe(exc)
        if not self._down_logged:
            self._down_logged = True
            log.warning(
                "Postgres unreachable (%s); direct writes fail, write-behind keeps spooling", self.last_error
            )

    def _note_up(self) -> None:
        if self._down_logged:
            self._down_logged = False
            log.warning("Postgres reachable again")


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
