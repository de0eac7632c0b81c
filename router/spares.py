"""Start a provisioned idle instance through supervisord's XML-RPC interface.

supervisord provisions EXAI_MAX_INSTANCES instance processes but autostarts only EXAI_INSTANCES;
the rest are spares the router may start when every running instance is busy. This speaks
XML-RPC over supervisord's unix socket with aiohttp (the stdlib client would block the loop).
"""

from __future__ import annotations

import logging
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

import aiohttp

from common.protocol import INSTANCE_PROGRAM, SUPERVISOR_GROUP

log = logging.getLogger(__name__)

_STARTABLE = frozenset({"STOPPED", "EXITED"})


class Spares:
    def __init__(self, socket_path: Path, *, cooldown: float = 15.0) -> None:
        self.socket_path = socket_path
        self.cooldown = cooldown
        self._recent: dict[str, float] = {}  # process name -> when we started it

    async def _call(self, method: str, *params: Any) -> Any:
        body = xmlrpc.client.dumps(params, method)
        connector = aiohttp.UnixConnector(path=str(self.socket_path))
        timeout = aiohttp.ClientTimeout(total=10)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as http,
            http.post("http://localhost/RPC2", data=body, headers={"Content-Type": "text/xml"}) as resp,
        ):
            text = await resp.text()
        result, _ = xmlrpc.client.loads(text)
        return result[0]

    async def start_one(self) -> str | None:
        """Start the lowest-numbered stopped instance process; None if there is none (or no supervisord)."""
        if not self.socket_path.exists():
            return None
        now = time.monotonic()
        if any(now - t < self.cooldown for t in self._recent.values()):
            return None  # one spare at a time: the last one may still be registering
        try:
            infos = await self._call("supervisor.getAllProcessInfo")
            stopped = sorted(
                p["name"]
                for p in infos
                if p.get("group") == SUPERVISOR_GROUP
                and str(p.get("name", "")).startswith(INSTANCE_PROGRAM)
                and p.get("statename") in _STARTABLE
            )
            if not stopped:
                return None
            name = stopped[0]
            self._recent[name] = now
            await self._call("supervisor.startProcess", f"{SUPERVISOR_GROUP}:{name}", False)
            log.info("started spare instance %s", name)
            return name
        except (OSError, aiohttp.ClientError, xmlrpc.client.Fault, TimeoutError) as exc:
            log.warning("could not start a spare instance: %s", exc)
            return None
