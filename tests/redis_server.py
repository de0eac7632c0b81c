"""A Redis server of a test's own, which the test may kill and restart (never the shared one).

Append-only persistence is on (fsync every second, Redis's default), so a restart finds what
was written up to about a second before a SIGKILL, as a production Redis with AOF would.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from common.fleet.embedded import EmbeddedRedis
from tests.ports import free_port


class OwnRedis:
    def __init__(self, data_dir: Path) -> None:
        self.server = EmbeddedRedis(data_dir, port=free_port())
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.server.url()

    def start(self) -> OwnRedis:
        self.server.ensure_initialized()
        log = self.server.data_dir.with_name(self.server.data_dir.name + ".log")
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [*self.server.command(), "--appendfsync", "everysec"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.server.data_dir,
                start_new_session=True,
            )
        proc = self.proc
        self.server.wait_ready(30, alive=lambda: proc.poll() is None)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown save, only what the AOF already holds survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
