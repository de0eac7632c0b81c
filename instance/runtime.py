"""The state one instance process shares between its tools, its HTTP endpoints and its lifecycle.

An instance serves one session at a time, so this is deliberately small: who we are, which
session we are bound to, how many calls are in flight, and the resources the lifespan opened.
Nothing here is an import-time global: `build_app` creates one `Runtime` and hands it around.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from common.errors import ConfigError, ShuttingDown, StorageUnavailable
from common.protocol import (
    ADMIN_PRINCIPAL,
    CLIENT_HEADER,
    DEFAULT_INSTANCE_HOST,
    ERA_HEADER,
    FENCE_HEADER,
    MCP_SESSION_ID,
    PRINCIPAL_HEADER,
    SESSION_HEADER,
    InstanceState,
    instance_process_name,
    principals_of,
    registry_id,
)
from common.settings import Settings
from instance.after_answer import after_answer
from instance.link_notices import Notices

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from instance.notify import Notifier
    from instance.providers import Providers
    from instance.storage import Storage

log = logging.getLogger(__name__)

LOCAL_SESSION = "local"
RETIRED_KEPT = 64  # ended bindings remembered (see `Runtime.retired`)


def supersedes(fence: str, bound: str) -> bool:
    """Whether lease token `fence` is later than `bound`'s: both numbers (a router that sends
    none gets no take-over), the first higher."""
    return fence.isdigit() and bound.isdigit() and int(fence) > int(bound)


def header(headers: Mapping[str, str], name: str) -> str | None:
    """Header `name` of a request's headers: Starlette's (any case) or a plain dict of them,
    whose names the transport gives in lowercase (instance/tools.headers_of)."""
    value = headers.get(name)
    return value if value is not None else headers.get(name.lower())


@dataclass(frozen=True)
class Identity:
    """Where this instance lives: its registry id, the address it listens on, and the address
    routers connect to (another host's routers need a routable one)."""

    id: str
    host: str
    port: int
    advertise: str = DEFAULT_INSTANCE_HOST
    name: str = ""  # the process name (stable across restarts, unlike a pod address in `id`)

    @property
    def spool_name(self) -> str:
        """Names the local spool, which a restarted process of the same name must replay."""
        return self.name or self.id


def resolve_identity(settings: Settings) -> Identity:
    """Work out id and port from EXAI_INSTANCE_ID / EXAI_INSTANCE_PORT / EXAI_INSTANCE_NUM.

    supervisord passes only the process number, so the number alone must be enough.
    """
    num = settings.instance_num
    port = settings.instance_port
    if port is None and num is not None:
        port = settings.instance_port_for(num)
    if port is None:
        raise ConfigError(
            "the instance has no port: set EXAI_INSTANCE_PORT, or EXAI_INSTANCE_NUM "
            "(port = EXAI_INSTANCE_BASE_PORT + number)"
        )
    if port > 65535:
        raise ConfigError(f"EXAI_INSTANCE_BASE_PORT + EXAI_INSTANCE_NUM gives port {port}, above 65535")
    name = settings.instance_id or (instance_process_name(num) if num is not None else f"instance_p{port}")
    advertise = settings.instance_advertise
    return Identity(
        id=registry_id(name, advertise),
        host=settings.instance_host,
        port=port,
        advertise=advertise,
        name=name,
    )


@dataclass
class Binding:
    """The session this instance serves, as the router described it in its headers."""

    session: str
    principal: str | None = None
    client: str | None = None
    era: str | None = None
    fence: str = ""  # the router's lease generation for this binding ("" if it sent none)
    recorded: bool = False


class Runtime:
    """Shared, mutable state of one instance; every field is owned by one event loop."""

    def __init__(self, settings: Settings, identity: Identity, *, version: str) -> None:
        self.settings = settings
        self.identity = identity
        self.version = version
        self.pid = os.getpid()
        self.started_at = time.time()
        self.state: InstanceState = "starting"
        self.binding: Binding | None = None
        # Set while a new session's first request takes the instance over (`take_over`).
        self.handover: asyncio.Future[None] | None = None
        # Bindings this instance has ended (reset, or taken over), as (session, fencing token):
        # a router whose copy of the session table is stale may still send that session's
        # requests here with that token, and binding it again would serve the session on two
        # instances (another router has resumed it elsewhere). A new lease has a new token.
        self.retired: deque[tuple[str, str]] = deque(maxlen=RETIRED_KEPT)
        self.inflight = 0
        self.calls_total = 0
        # EXAI_TEST_LEAK_PER_CALL_BYTES (test only): references kept on purpose, see call().
        self._test_leak: list[bytes] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self._background: set[asyncio.Task[None]] = set()
        # Opened by the lifespan (see instance.app), None before and after.
        self.providers: Providers | None = None
        self.storage: Storage | None = None
        self.storage_error: str | None = None
        self.redis: Redis | None = None
        self.notifier: Notifier | None = None  # publishes to the session's router-held streams
        self.links: Any = None  # instance.links.Links, set when the link tools are registered
        # Words for a session given with its next tool answer (instance/link_notices.py).
        self.notices = Notices(self.notify)
        # Hooks set by the app: wake the registry heartbeat, close the SDK's MCP sessions.
        self.on_change: Callable[[], None] = lambda: None
        # Write the registry entry now; False if Redis was unreachable (set by the app).
        self.register_now: Callable[[], Awaitable[bool]] | None = None
        self.close_mcp_sessions: Callable[[], Any] | None = None

    # --- session binding -------------------------------------------------------------------
    @property
    def session(self) -> str | None:
        return self.binding.session if self.binding else None

    def observe(self, headers: Mapping[str, str]) -> bool:
        """Bind to the session named by the router's headers; False if bound to another one.

        An instance serves one session until the router resets it: a request for another
        session means some router's view of the leases is wrong (Redis lost them), and
        answering it would hand this session's process to a second client.
        """
        sid = header(headers, SESSION_HEADER)
        if not sid:
            return True
        fence = header(headers, FENCE_HEADER) or ""
        current = self.binding
        if current is not None:
            if current.session != sid:
                return False  # unless it may take over (`admit`)
            if fence and fence != current.fence:
                current.fence = fence  # the same session under a renewed lease
                after_answer(self.on_change)
            return True
        if fence and (sid, fence) in self.retired:
            return False  # that lease was ended here: a stale router's request (`admit` logs it)
        self.binding = Binding(
            session=sid,
            principal=header(headers, PRINCIPAL_HEADER),
            client=header(headers, CLIENT_HEADER),
            era=header(headers, ERA_HEADER),
            fence=fence,
        )
        # The registry entry and the log follow the answer: the binding itself (above) is what
        # fences other sessions off, and the lease and session record are in Redis already.
        after_answer(partial(log.info, "bound to session %s (fence %s)", sid, fence or "-"))
        after_answer(self.on_change)
        return True

    async def admit(self, headers: Mapping[str, str]) -> bool:
        """`observe` for a request that found a take-over in progress (once it is done) or
        another session bound (`take_over`); False, logged: the request is fenced off."""
        if self.handover is not None:
            await asyncio.shield(self.handover)
            if self.observe(headers):
                return True
        if await self.take_over(headers):
            return True
        current = self.binding
        log.warning(
            "refused session %s: bound to %s (fence %s)",
            header(headers, SESSION_HEADER),
            current.session if current else "-",
            current.fence if current else "-",
        )
        return False

    def may_reset(self, headers: Mapping[str, str]) -> bool:
        """A reset must name the bound session and its fencing token (or find nothing bound),
        or come from a later lease of this instance (`supersedes`)."""
        current = self.binding
        if current is None:
            return True
        fence = header(headers, FENCE_HEADER) or ""
        if header(headers, SESSION_HEADER) != current.session:
            return supersedes(fence, current.fence) and not self.inflight
        return not current.fence or fence == current.fence

    async def take_over(self, headers: Mapping[str, str]) -> bool:
        """Serve the session the headers name in place of the bound one, if its lease of this
        instance is later than the bound one's; False (the caller fences the request off) if not.

        A router short of instances hands an idle session's instance straight to a waiting one
        (router/binding.py `reclaim`): it parks the idle session and moves the lease in Redis,
        which gives the new holder a higher fencing token (the instance's lease generation only
        grows), but it does not reset the instance first. The new session's first request
        does the reset here: the SDK's sessions of the old one are closed and the binding
        changes, before anything of the new session runs. Refused while a tool call is in
        flight (the old session is not idle after all: its router re-binds it elsewhere when
        the instance fences its next request off) and for a token that is not higher, such as
        one handed out after Redis lost the lease counters: that needs the explicit reset.
        """
        current = self.binding
        fence = header(headers, FENCE_HEADER) or ""
        if current is None or not supersedes(fence, current.fence) or self.inflight:
            return False
        if self.state in ("draining", "stopping"):  # taking no new session
            return False
        log.info(
            "session %s takes this instance over from session %s (fence %s after %s)",
            header(headers, SESSION_HEADER),
            current.session,
            fence,
            current.fence,
        )
        done = asyncio.get_running_loop().create_future()
        self.handover = done
        try:
            self._retire(current)
            self.binding = None
            self.observe(headers)  # bound now: a late request of the old session is fenced off
            if self.close_mcp_sessions is not None:
                await self.close_mcp_sessions()
        finally:
            self.handover = None
            done.set_result(None)
        return True

    @property
    def scoped(self) -> bool:
        """Whether threads, notes and tasks are private to a principal: only with several of them."""
        return len(set(principals_of(self.settings.auth_tokens).values())) > 1

    def principal_for(self, headers: Mapping[str, str] | None) -> str | None:
        """Who is calling, as the router said (recorded on what the call creates)."""
        principal = header(headers or {}, PRINCIPAL_HEADER)
        if principal is None and self.binding is not None:
            principal = self.binding.principal
        return principal or None

    def owner_for(self, headers: Mapping[str, str] | None) -> str | None:
        """The principal whose threads and tasks this call may see; None: it may see all of them."""
        if not self.scoped:
            return None
        principal = self.principal_for(headers)
        if principal == ADMIN_PRINCIPAL:
            return None
        return principal or LOCAL_SESSION

    def session_for(self, headers: Mapping[str, str] | None) -> str:
        """The session id that scopes tasks and notes for this request."""
        if headers:
            sid = header(headers, SESSION_HEADER) or header(headers, MCP_SESSION_ID)
            if sid:
                return sid
        return self.session or LOCAL_SESSION

    async def reset(self) -> None:
        """Forget the bound session and close the SDK's sessions, ready for the next one.

        The registry entry says so before this returns (the reset's answer): the router frees
        the lease once it has the answer, and an entry still naming the old session then would
        send the next opening down the allocator's slow path (a lease to reconcile, the whole
        registry read, a second reset)."""
        self._retire(self.binding)
        self.binding = None
        if self.close_mcp_sessions is not None:
            await self.close_mcp_sessions()
        if self.register_now is None or not await self.register_now():
            self.on_change()  # the heartbeat writes it (again while Redis is unreachable)

    def _retire(self, binding: Binding | None) -> None:
        if binding is not None and binding.fence:
            self.retired.append((binding.session, binding.fence))

    def set_state(self, state: InstanceState) -> None:
        if self.state != state:
            log.info("state %s -> %s", self.state, state)
            self.state = state
            self.on_change()

    # --- in-flight calls -------------------------------------------------------------------
    @asynccontextmanager
    async def call(self) -> AsyncIterator[None]:
        """Count a tool call in flight, refusing new ones once the process is stopping."""
        if self.state == "stopping":
            raise ShuttingDown("this instance is shutting down and takes no new calls")
        self.inflight += 1
        self.calls_total += 1
        if self.settings.test_leak_per_call_bytes:
            self._test_leak.append(os.urandom(self.settings.test_leak_per_call_bytes))
        self._idle.clear()
        try:
            yield
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight; False if `timeout` ran out first."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def background(self, work: Awaitable[Any], *, what: str) -> None:
        """Run best-effort work (telemetry) without awaiting it; failures are logged, not raised."""

        async def run() -> None:
            try:
                await work
            except Exception as exc:
                log.warning("%s failed: %s", what, exc)

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def notify(self, session_id: str | None, method: str, params: dict[str, Any] | None = None) -> None:
        """Send a notification to the session's streams (held by the router); never blocks."""
        if self.notifier is not None:
            self.notifier.publish(session_id or self.session, method, params)

    def require_storage(self) -> Storage:
        if self.storage is None:
            raise StorageUnavailable(
                "storage is not available on this instance"
                + (f" ({self.storage_error})" if self.storage_error else "")
            )
        return self.storage

    def health(self) -> dict[str, Any]:
        return {
            "id": self.identity.id,
            "state": self.state,
            "session": self.session or "",
            "fence": self.binding.fence if self.binding else "",
            "inflight": self.inflight,
            "port": self.identity.port,
            "pid": self.pid,
            "version": self.version,
        }
