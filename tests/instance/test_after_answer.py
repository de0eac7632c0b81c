"""Work deferred until a call's answer is written (instance/timing.after_answer)."""

from __future__ import annotations

import time

from instance.timing import CallClock, after_answer, answered, current_call


def test_work_waits_for_the_answer_and_runs_once() -> None:
    ran: list[str] = []
    clock = CallClock(time.perf_counter())
    token = current_call.set(clock)
    try:
        assert after_answer(lambda: ran.append("store")) is True
        assert ran == []  # the answer is not written yet
        answered(clock)
        assert ran == ["store"]
        answered(clock)  # the request's end after its answer: nothing runs twice
        assert ran == ["store"]
        assert after_answer(lambda: ran.append("late")) is False  # answered already: at once
        assert ran == ["store", "late"]
    finally:
        current_call.reset(token)


def test_outside_a_request_the_work_runs_at_once_and_a_failure_is_contained() -> None:
    ran: list[str] = []
    assert after_answer(lambda: ran.append("now")) is False
    assert ran == ["now"]
    clock = CallClock(time.perf_counter())
    token = current_call.set(clock)
    try:

        def boom() -> None:
            raise RuntimeError("bug")

        after_answer(boom)
        after_answer(lambda: ran.append("next"))
        answered(clock)  # the failing one is logged; the next still runs
        assert ran == ["now", "next"]
    finally:
        current_call.reset(token)
