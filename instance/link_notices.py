"""What happened to a session's link-group requests after (or beside) its call's answer, told in words.

Two things can go wrong where the caller cannot see it in the answer of the call that caused it:

- an event a `link_send` (or a group task, note or reservation change) was answered for is
  refused when the flusher stores it, because the group was deleted or the sender was no longer
  a member (common/links.store_spooled): the call returned the event's uuid a moment before;
- a join asked for by the `Exai-Link-Group` header is refused (another principal's group, a
  malformed name): the header is not a call, and the tool call it rides on is another tool's.

Each is kept here as a notice for its session and given with the session's next tool answer on
this instance: a dict answer gains `"notices": [{"code", "message", ...}]`, an error answer
gains the same words after its own (`notices_text`). That is what an agent in Claude Code or VS
Code actually reads: tool answers go to the model, while server log notifications only reach
the client's log. A notice is also sent at once as an MCP log notification
(`notifications/message`, level `warning`, logger `exai.links`) through the session's
router-held stream, so a client that shows server logs, or a session that moved to another
instance before its next call, hears of it too; and the instance logs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

LOG_METHOD = "notifications/message"
MAX_PER_SESSION = 100  # notices kept for one session; beyond that they are counted in one notice
MAX_SESSIONS = 1000  # sessions with pending notices kept on one instance (it serves one at a time)


class Notices:
    """Pending notices per session, given with the session's next tool answer."""

    def __init__(self, notify: Callable[[str, str, dict[str, Any]], None]) -> None:
        self._notify = notify
        self._pending: dict[str, list[dict[str, Any]]] = {}
        self._overflow: dict[str, int] = {}
        self.added = 0
        self.given = 0

    def add(self, session: str, code: str, message: str, **data: Any) -> None:
        notice = {"code": code, "message": message, **data}
        log.warning("notice for session %s: [%s] %s", session[:8], code, message)
        self.added += 1
        pending = self._pending.setdefault(session, [])
        if len(pending) < MAX_PER_SESSION:
            pending.append(notice)
        else:
            self._overflow[session] = self._overflow.get(session, 0) + 1
        if len(self._pending) > MAX_SESSIONS:  # sessions this instance no longer serves
            oldest = next(iter(self._pending))
            self._pending.pop(oldest, None)
            self._overflow.pop(oldest, None)
        try:
            self._notify(session, LOG_METHOD, {"level": "warning", "logger": "exai.links", "data": notice})
        except Exception as exc:  # the notice is still given with the next answer
            log.debug("log notification of a notice failed: %s", exc)

    @property
    def owed(self) -> bool:
        """Whether any session has notices waiting (one test per tool call when none do)."""
        return bool(self._pending)

    def pending(self, session: str) -> list[dict[str, Any]]:
        """The session's notices, left in place (link_status shows them and then gives them)."""
        return list(self._pending.get(session, []))

    def take(self, session: str) -> list[dict[str, Any]]:
        """The session's notices, oldest first; they are given once."""
        notices = self._pending.pop(session, [])
        more = self._overflow.pop(session, 0)
        if more:
            notices.append(
                {
                    "code": "notices_dropped",
                    "message": f"{more} more notice(s) like these were not kept (the instance logged them).",
                }
            )
        self.given += len(notices)
        return notices


def attach(result: Any, notices: list[dict[str, Any]]) -> Any:
    """`result` (a tool's dict answer) with the notices added."""
    if isinstance(result, dict):
        return {**result, "notices": [*result.get("notices", []), *notices]}
    return result


def notices_text(notices: list[dict[str, Any]]) -> str:
    """The notices as lines to add after an error answer's own words."""
    return "".join(f"\n[notice: {n['code']}] {n['message']}" for n in notices)
