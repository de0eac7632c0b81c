"""A stop re-sends SIGTERM to the fleet's own processes that supervisord is still stopping.

supervisord can lose a SIGTERM sent while it is still starting a process (between its fork and
the exec); `SupervisorControl.wait_stopped` and `shutdown` re-send it (`_resignal`). Routers
and instances get it again; anything else supervisord runs (Postgres, Redis) is left to
supervisord, and so is a process that is not being stopped. Real child processes, real signals.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.fleet.supervisor import INSTANCE_PROGRAM, SUPERVISOR_GROUP, ProcessInfo, SupervisorControl


@contextmanager
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def info(group: str, name: str, state: str, pid: int) -> ProcessInfo:
    return ProcessInfo(
        name=name,
        group=group,
        state=state,
        pid=pid,
        description="",
        start=0.0,
        now=0.0,
        exit_status=0,
        spawn_error="",
    )


def test_routers_and_instances_being_stopped_get_sigterm_again(tmp_path: Path) -> None:
    control = SupervisorControl(tmp_path / "none.sock")
    with child() as router, child() as numbered, child() as instance, child() as redis, child() as running:
        control._resignal(
            [
                info("router", "router", "STOPPING", router.pid),
                info("router", "router_2", "STOPPING", numbered.pid),
                info(SUPERVISOR_GROUP, f"{INSTANCE_PROGRAM}_03", "STOPPING", instance.pid),
                info("redis", "redis", "STOPPING", redis.pid),
                info("router", "router_1", "RUNNING", running.pid),
            ]
        )
        for proc in (router, numbered, instance):
            assert proc.wait(10) == -signal.SIGTERM
        for proc in (redis, running):
            assert proc.poll() is None
