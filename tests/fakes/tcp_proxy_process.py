"""The loopback forwarder (tests/fakes/tcp_proxy.py) in a process of its own, for benchmarks.

In the benchmark's process, the forwarder's thread shares the GIL with the benchmark's own
client loop: while it copies Postgres traffic (or, slowed, wakes up to release held chunks),
the client cannot read an answer it is timing, and that wait lands in the latency the
benchmark attributes to the fleet. The network between an instance and Postgres shares
nothing with the instance's clients, so the benchmarks run it here, as they run the fake
provider (tests/fakes/provider_process.py).

The parent's handle has the thread version's interface (`port`, `delay`, `up`, `down`, `hang`,
`unhang`, `running`); each control is one JSON line on the child's stdin, answered by one line
on its stdout once it has taken effect.

    python -m tests.fakes.tcp_proxy_process HOST PORT   # prints {"port": N}, then serves commands
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from tests.fakes.child import child_process
from tests.fakes.tcp_proxy import TcpProxy


class TcpProxyProcess:
    """The parent's handle on a forwarder running in a child process."""

    host = "127.0.0.1"

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._delay = 0.0
        self._child: subprocess.Popen[bytes] | None = None

    def _order(self, **command: Any) -> dict[str, Any]:
        child = self._child
        if child is None or child.stdin is None or child.stdout is None:
            raise RuntimeError("the forwarder's process is not running")
        child.stdin.write(json.dumps(command).encode() + b"\n")
        child.stdin.flush()
        return _answer(child.stdout, child)

    @property
    def delay(self) -> float:
        return self._delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        if seconds != self._delay:
            self._order(delay=seconds)
            self._delay = seconds

    def up(self) -> None:
        self._order(up=True)

    def down(self) -> None:
        self._order(down=True)

    def hang(self) -> None:
        self._order(hang=True)

    def unhang(self) -> None:
        self._order(unhang=True)

    @contextmanager
    def running(self) -> Iterator[TcpProxyProcess]:
        target = (self.target[0], str(self.target[1]))
        with child_process("tests.fakes.tcp_proxy_process", *target, what="the forwarder") as (child, first):
            self._child = child
            self.port = int(first["port"])
            try:
                yield self
            finally:
                self._child = None


def _answer(stdout: IO[bytes], child: subprocess.Popen[bytes]) -> dict[str, Any]:
    line = stdout.readline()
    if not line:
        raise RuntimeError(f"the forwarder's process stopped (exit {child.poll()})")
    answer: dict[str, Any] = json.loads(line)
    if "error" in answer:
        raise RuntimeError(f"the forwarder's process refused a command: {answer['error']}")
    return answer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    args = ap.parse_args()
    proxy = TcpProxy(args.host, args.port)
    with proxy.running():
        print(json.dumps({"port": proxy.port}), flush=True)
        for line in sys.stdin:  # until the parent closes it
            try:
                command = json.loads(line)
                if "delay" in command:
                    proxy.delay = float(command["delay"])
                if command.get("down"):
                    proxy.down()
                if command.get("up"):
                    proxy.up()
                if command.get("hang"):
                    proxy.hang()
                if command.get("unhang"):
                    proxy.unhang()
            except Exception as exc:  # the parent hears of it rather than waiting on a dead child
                print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
                continue
            print(json.dumps({"ok": True}), flush=True)


if __name__ == "__main__":
    main()
