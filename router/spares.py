"""Start a provisioned idle instance through supervisord when every running one is busy.

supervisord provisions EXAI_MAX_INSTANCES instance processes but autostarts only EXAI_INSTANCES;
the others are spares. One start at a time (with a cooldown), because a spare needs a moment
to register and every waiting allocation would otherwise start one more.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from common.errors import SupervisorFault, SupervisorUnavailable
from common.supervisor import SupervisorClient

log = logging.getLogger(__name__)


class Spares:
    def __init__(self, socket_path: Path, *, cooldown: float = 10.0) -> None:
        self.socket_path = socket_path
        self.cooldown = cooldown
        self._last = -float("inf")
        self._client: SupervisorClient | None = None

    async def start_one(self) -> str | None:
        """The process name started, or None (none left, no supervisord, or one just started)."""
        if not self.socket_path.exists() or time.monotonic() - self._last < self.cooldown:
            return None
        self._last = time.monotonic()
        if self._client is None:
            self._client = SupervisorClient(self.socket_path, timeout=10.0)
        try:
            name = await self._client.start_spare()
        except (SupervisorUnavailable, SupervisorFault) as exc:
            log.warning("could not start a spare instance: %s", exc)
            return None
        if name:
            log.info("started spare instance %s", name)
        return name

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
