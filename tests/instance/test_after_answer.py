"""What a call sets off but its answer does not need waits for the answer (instance/after_answer.py).

The instance's middleware is driven here with a stand-in for the SDK app, so the order of
events is exact: a new binding's registry write (`Runtime.on_change`) must come after the
answer's last byte, and must come at all (a long call, an error, a fenced call, no request).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from common.protocol import FENCE_HEADER, INTERNAL_TOKEN_HEADER, SESSION_HEADER
from common.settings import Settings
from instance import after_answer
from instance.after_answer import AfterAnswer
from instance.app import InternalTokenGate
from instance.runtime import Identity, Runtime

TOKEN = "after-answer-token"


def _scope(session: str, fence: str = "1") -> dict[str, Any]:
    headers = [
        (INTERNAL_TOKEN_HEADER.lower().encode(), TOKEN.encode()),
        (SESSION_HEADER.lower().encode(), session.encode()),
        (FENCE_HEADER.lower().encode(), fence.encode()),
    ]
    return {"type": "http", "method": "POST", "path": "/mcp", "headers": headers}


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"{}", "more_body": False}


class _Harness:
    """The middleware around a stand-in app; `events` is the order of what happened."""

    def __init__(self, settings: Settings, app: Callable[..., Any] | None = None) -> None:
        self.events: list[str] = []
        self.runtime = Runtime(settings, Identity(id="aa-test", host="127.0.0.1", port=1), version="t")
        self.runtime.on_change = lambda: self.events.append("registry")
        handler = app or self.answer  # POST /mcp goes to the SDK handler; nothing else is sent here
        self.middleware = InternalTokenGate(handler, handler, self.runtime, TOKEN)

    async def answer(self, scope: Any, receive: Any, send: Any) -> None:
        self.events.append("app")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.events.append(f"status {message['status']}")
        elif not message.get("more_body", False):
            self.events.append("answered")

    async def call(self, session: str, fence: str = "1") -> None:
        await self.middleware(_scope(session, fence), _receive, self.send)


async def test_a_new_binding_is_registered_after_the_answer(make_settings: Callable[..., Settings]) -> None:
    h = _Harness(make_settings(internal_token=TOKEN))
    await h.call("s1")
    assert h.runtime.session == "s1"  # bound before the call ran: the fencing is not put off
    assert h.events == ["app", "status 200", "answered", "registry"]
    h.events.clear()
    await h.call("s1")  # bound already: nothing to register
    assert h.events == ["app", "status 200", "answered"]
    await h.call("s1", fence="2")  # the same session under a renewed lease: registered, after
    assert h.events[-2:] == ["answered", "registry"] and h.runtime.binding is not None
    assert h.runtime.binding.fence == "2"


async def test_another_session_is_fenced_off_and_nothing_is_registered(
    make_settings: Callable[..., Settings],
) -> None:
    h = _Harness(make_settings(internal_token=TOKEN))
    await h.call("s1")
    h.events.clear()
    await h.call("s2")
    assert h.events == ["status 409", "answered"] and h.runtime.session == "s1"


async def test_a_long_call_registers_before_its_answer(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call that runs longer than LATEST (a chat) does not hold the registry write back."""
    monkeypatch.setattr(after_answer, "LATEST", 0.01)
    registered = asyncio.Event()

    async def long_call(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.wait_for(registered.wait(), 10)  # fails the test if the write never comes
        await h.answer(scope, receive, send)

    h = _Harness(make_settings(internal_token=TOKEN), long_call)
    h.runtime.on_change = lambda: (h.events.append("registry"), registered.set())  # type: ignore[func-returns-value]
    await h.call("s1")
    assert h.events == ["registry", "app", "status 200", "answered"]


async def test_a_failed_call_still_registers(make_settings: Callable[..., Settings]) -> None:
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("the app failed")

    h = _Harness(make_settings(internal_token=TOKEN), broken)
    with pytest.raises(RuntimeError):
        await h.call("s1")
    # the gate's plain 500 goes out first; the binding is still written, after it
    assert h.events == ["status 500", "answered", "registry"] and h.runtime.session == "s1"


async def test_outside_a_request_work_runs_at_once() -> None:
    ran: list[str] = []
    after_answer.after_answer(lambda: ran.append("now"))
    assert ran == ["now"]
    pending = AfterAnswer()
    pending.add(lambda: ran.append("later"))
    assert ran == ["now"]
    pending.run()
    pending.add(lambda: ran.append("after the answer: at once"))
    assert ran == ["now", "later", "after the answer: at once"]


async def test_put_off_work_runs_once_and_says_whether_it_waited() -> None:
    ran: list[str] = []
    pending = AfterAnswer()
    token = after_answer.current_answer.set(pending)
    try:
        assert after_answer.after_answer(lambda: ran.append("store")) is True
        assert ran == []  # the answer is not written yet
        pending.run()
        assert ran == ["store"]
        pending.run()  # the request's end after its answer: nothing runs twice
        assert ran == ["store"]
        assert after_answer.after_answer(lambda: ran.append("late")) is False  # answered: at once
        assert ran == ["store", "late"]
    finally:
        after_answer.current_answer.reset(token)


async def test_a_callback_outside_the_request_puts_work_off_for_that_request() -> None:
    # e.g. a Redis reply's callback, which runs outside the request's context
    ran: list[str] = []
    pending = AfterAnswer()
    assert after_answer.after_answer_of(pending, lambda: ran.append("count")) is True
    assert after_answer.after_answer_of(None, lambda: ran.append("no request")) is False
    assert ran == ["no request"]
    pending.run()
    assert ran == ["no request", "count"]


async def test_a_failing_piece_of_put_off_work_does_not_stop_the_rest() -> None:
    ran: list[str] = []
    pending = AfterAnswer()

    def boom() -> None:
        raise RuntimeError("bug")

    pending.add(boom)
    pending.add(lambda: ran.append("next"))
    pending.run()  # the failing one is logged; the next still runs
    assert ran == ["next"]


async def test_a_later_lease_takes_the_instance_over_and_the_old_session_is_fenced_off(
    make_settings: Callable[..., Settings],
) -> None:
    """A router short of instances moves an idle session's lease to a waiting one without a
    reset (router/binding.py `reclaim`): the new session's higher token takes the instance
    over on its first request, the SDK's sessions of the old one closed before it runs."""
    h = _Harness(make_settings(internal_token=TOKEN))
    closed: list[str | None] = []

    async def close() -> None:
        closed.append(h.runtime.session)

    h.runtime.close_mcp_sessions = close
    await h.call("s1", fence="7")
    h.events.clear()
    await h.call("s2", fence="8")
    assert closed == ["s2"]  # bound to the new session first: nothing of s1's can slip in
    assert h.events == ["app", "status 200", "answered", "registry"]
    assert h.runtime.binding is not None and h.runtime.binding.fence == "8"
    h.events.clear()
    await h.call("s1", fence="7")
    assert h.events == ["status 409", "answered"] and h.runtime.session == "s2"
    assert h.runtime.may_reset({SESSION_HEADER: "s2", FENCE_HEADER: "8"})
    assert not h.runtime.may_reset({SESSION_HEADER: "s1", FENCE_HEADER: "7"})


async def test_a_binding_ended_here_is_not_bound_again_by_a_stale_request(
    make_settings: Callable[..., Settings],
) -> None:
    """A session parked (reset) or taken over here may have been resumed elsewhere since; a
    router whose copy is stale still sends its requests here with the ended lease's token.
    The instance must fence them off rather than bind that session again, or the session would
    run on two instances. A new lease of the same session (a new token) binds as usual."""
    h = _Harness(make_settings(internal_token=TOKEN))
    await h.call("s1", fence="7")
    await h.runtime.reset()  # parked
    h.events.clear()
    await h.call("s1", fence="7")
    assert h.events == ["status 409", "answered"] and h.runtime.binding is None
    await h.call("s2", fence="8")
    await h.call("s3", fence="9")  # takes s2's lease over
    h.events.clear()
    await h.call("s2", fence="8")
    assert h.events == ["status 409", "answered"] and h.runtime.session == "s3"
    await h.runtime.reset()
    h.events.clear()
    await h.call("s2", fence="8")  # still the ended lease, though nothing is bound now
    assert h.events == ["status 409", "answered"] and h.runtime.binding is None
    await h.call("s1", fence="10")  # resumed here later under a new lease
    assert h.runtime.session == "s1" and h.runtime.binding is not None and h.runtime.binding.fence == "10"


async def test_no_take_over_by_a_token_not_higher_or_during_a_call(
    make_settings: Callable[..., Settings],
) -> None:
    h = _Harness(make_settings(internal_token=TOKEN))
    await h.call("s1", fence="7")
    h.events.clear()
    for fence in ("7", "6", "", "x9"):  # not higher, or not a token: a router's view is wrong
        await h.call("s2", fence=fence)
        assert h.events == ["status 409", "answered"] and h.runtime.session == "s1", fence
        assert not h.runtime.may_reset({SESSION_HEADER: "s2", FENCE_HEADER: fence})
        h.events.clear()
    h.runtime.inflight = 1  # s1 is working after all (another router's call)
    await h.call("s2", fence="8")
    assert h.events == ["status 409", "answered"] and h.runtime.session == "s1"
    assert not h.runtime.may_reset({SESSION_HEADER: "s2", FENCE_HEADER: "8"})
    h.runtime.inflight = 0
    h.runtime.set_state("draining")  # taking no new session
    h.events.clear()
    await h.call("s2", fence="8")
    assert h.events == ["status 409", "answered"] and h.runtime.session == "s1"
    # A reset from the later lease's router (its session ended before its first call) frees it.
    h.runtime.set_state("ready")
    assert h.runtime.may_reset({SESSION_HEADER: "s2", FENCE_HEADER: "8"})


async def test_requests_during_a_take_over_wait_for_it(make_settings: Callable[..., Settings]) -> None:
    """While the old session's SDK sessions close, the new session's other requests wait and
    are then served; the old session's are fenced off; the close runs once."""
    h = _Harness(make_settings(internal_token=TOKEN))
    release = asyncio.Event()
    closes = 0

    async def slow_close() -> None:
        nonlocal closes
        closes += 1
        await release.wait()

    h.runtime.close_mcp_sessions = slow_close
    await h.call("s1", fence="3")
    h.events.clear()
    first = asyncio.create_task(h.call("s2", fence="4"))
    await asyncio.sleep(0.01)
    assert h.runtime.handover is not None and h.events == []
    second = asyncio.create_task(h.call("s2", fence="4"))
    old = asyncio.create_task(h.call("s1", fence="3"))
    await asyncio.sleep(0.01)
    assert h.events == []  # all three wait for the take-over
    release.set()
    await asyncio.gather(first, second, old)
    assert closes == 1 and h.runtime.session == "s2" and h.runtime.handover is None
    assert sorted(h.events).count("status 200") == 2 and h.events.count("status 409") == 1
