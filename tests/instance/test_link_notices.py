"""instance/link_notices.py: words owed to a session, given once, to that session only."""

from __future__ import annotations

from typing import Any

from instance.link_notices import MAX_PER_SESSION, Notices, attach, notices_text


def test_notices_are_given_once_to_their_session_and_sent_as_log_notifications() -> None:
    sent: list[tuple[str, str, dict[str, Any]]] = []
    notices = Notices(lambda sid, method, params: sent.append((sid, method, params)))
    assert not notices.owed
    notices.add("s-1", "link_event_refused", "Your link event e-1 was not delivered.", event="e-1")
    assert notices.owed
    assert sent == [
        (
            "s-1",
            "notifications/message",
            {
                "level": "warning",
                "logger": "exai.links",
                "data": {"code": "link_event_refused", "message": "Your link event e-1 was not delivered.",
                         "event": "e-1"},
            },
        )
    ]  # fmt: skip
    assert notices.take("s-2") == []  # another session's answer carries nothing
    assert notices.pending("s-1")[0]["event"] == "e-1"
    given = notices.take("s-1")
    assert [n["event"] for n in given] == ["e-1"]
    assert notices.take("s-1") == [] and not notices.owed
    assert attach({"status": "success"}, given)["notices"] == given
    assert notices_text(given) == "\n[notice: link_event_refused] Your link event e-1 was not delivered."


def test_a_flood_of_notices_is_bounded_and_says_how_many_were_not_kept() -> None:
    notices = Notices(lambda *_: None)
    for n in range(MAX_PER_SESSION + 5):
        notices.add("s-1", "link_event_refused", f"event {n}")
    given = notices.take("s-1")
    assert len(given) == MAX_PER_SESSION + 1
    assert given[-1]["code"] == "notices_dropped" and given[-1]["message"].startswith("5 more")


def test_a_failing_log_notification_keeps_the_notice() -> None:
    def broken(*_: Any) -> None:
        raise RuntimeError("no Redis")

    notices = Notices(broken)
    notices.add("s-1", "link_header_refused", "refused")
    assert [n["code"] for n in notices.take("s-1")] == ["link_header_refused"]
