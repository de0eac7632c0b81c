"""A small client of the router's admin API for the `exai` CLI (`exai sessions`, `exai status`).

Synchronous on purpose: the CLI runs no event loop, and one short request per command is
all it needs.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, ClassVar

from common.errors import ExaiError
from common.settings import Settings


class AdminUnavailable(ExaiError):
    """The router's admin API could not be reached or refused the token."""

    code = "admin_unavailable"
    default_hint: ClassVar[str | None] = (
        "Is the fleet up (`exai status`)? The admin token is EXAI_ADMIN_TOKEN or <state>/admin_token."
    )


class AdminRefused(AdminUnavailable):
    """The router's admin API answered, and refused the request (its own words)."""

    code = "admin_refused"
    default_hint = None


def _refusal(exc: urllib.error.HTTPError, path: str) -> AdminUnavailable:
    """The router's error body (`{"error", "message", "hint"}`) as the CLI's error; without one,
    the status code and the usual hint (a proxy or another program on the port)."""
    try:
        body = json.loads(exc.read() or b"null")
    except (ValueError, OSError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        hint = body.get("hint")
        return AdminRefused(
            f"router admin API answered {exc.code} for {path}: {body['message']}",
            hint=hint if isinstance(hint, str) else None,
        )
    return AdminUnavailable(f"router admin API answered {exc.code} for {path}")


def _base(settings: Settings) -> str:
    host = "127.0.0.1" if settings.router_host in ("0.0.0.0", "::", "") else settings.router_host
    return f"http://{host}:{settings.router_port}"


def admin_get(
    settings: Settings, token: str, path: str, *, timeout: float = 5.0, method: str = "GET", body: Any = None
) -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(_base(settings) + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise _refusal(exc, path) from None
    except (urllib.error.URLError, OSError) as exc:
        raise AdminUnavailable(f"router admin API unreachable at {_base(settings)} ({exc})") from None


def fetch_sessions(settings: Settings, token: str) -> list[dict[str, Any]]:
    return list(admin_get(settings, token, "/admin/sessions")["sessions"])


def evict_instance(settings: Settings, token: str, instance_id: str, wait: float) -> dict[str, Any]:
    """Ask the router to park the sessions of an instance about to stop (see `exai scale`)."""
    path = f"/admin/instances/{urllib.parse.quote(instance_id)}/evict?wait={wait:g}"
    return dict(admin_get(settings, token, path, timeout=wait + 15, method="POST"))


def fetch_instances(settings: Settings, token: str) -> list[dict[str, Any]]:
    return list(admin_get(settings, token, "/admin/instances")["instances"])


def set_draining(settings: Settings, token: str, instance_id: str, draining: bool) -> dict[str, Any]:
    """Drain an instance (no new sessions) or undo that."""
    path = f"/admin/instances/{urllib.parse.quote(instance_id, safe='')}/drain"
    return dict(admin_get(settings, token, path, method="POST" if draining else "DELETE"))


def sessions_by_instance(settings: Settings, token: str) -> dict[str, str]:
    """instance id -> session id holding it (for `exai status`)."""
    return {i["id"]: i["session"] for i in fetch_instances(settings, token) if i.get("session")}


def _age(ts: float, now: float) -> str:
    s = max(0, int(now - ts))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def sessions_table(sessions: list[dict[str, Any]], *, now: float | None = None) -> str:
    now = time.time() if now is None else now
    rows = [("SESSION", "STATE", "INSTANCE", "CLIENT", "ERA", "AGE", "IDLE", "INFLIGHT", "TOTAL")]
    for s in sessions:
        rows.append(
            (
                s["id"],
                s.get("state") or "-",
                s.get("instance") or "-",
                s.get("client") or "-",
                s["era"],
                _age(s["created"], now),
                _age(s["last_seen"], now),
                str(s.get("inflight", 0)),
                str(s.get("total", 0)),
            )
        )
    if len(rows) == 1:
        return "no sessions"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def links_table(groups: list[dict[str, Any]]) -> str:
    """`exai links`: one line per group, then one per member with its cursor."""
    if not groups:
        return "no link groups"
    lines = []
    for g in groups:
        lines.append(f"{g['group']}  owner={g.get('principal') or '-'}  events={g['events']}")
        for m in g["members"]:
            lines.append(
                f"  {m['session']}  {m.get('client') or '-'}  cursor={m['cursor']} behind={m['behind']}"
                f"  last_seen={m['last_seen']}"
            )
    return "\n".join(lines)
