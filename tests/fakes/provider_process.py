"""The fake provider (tests/fakes/provider.py) in a process of its own, for benchmarks.

In-process, the fake's server thread shares the benchmark's GIL: while it parses a request or
counts an answer's tokens with a real tokenizer, the benchmark's own client loop cannot run,
and with several sessions at once that wait lands in the latency the benchmark attributes to
the fleet. A provider on the internet shares nothing with its client, so the benchmarks run
this one in its own process.

The child serves the same API and two control routes under `/_fake/`: `POST /_fake/reset`
(a default `Behaviour`'s plain fields as JSON) and `GET /_fake/hits` (every hit, as JSON).
The parent's `areset` / `asnapshot` call them without blocking its loop. Timestamps are
`time.monotonic()`, which Linux keeps system-wide, so durations read the same in both.

    python -m tests.fakes.provider_process [--delay S]   # prints {"port": N}, serves until stdin closes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.fakes.child import child_process
from tests.fakes.provider import Behaviour, FakeProvider, Hit, ProviderUrls

_PLAIN = ("delay", "status", "retry_after", "hang", "content", "chunk_delay")  # Behaviour's JSON fields


class _Controlled(FakeProvider):
    """The fake with its control routes."""

    def app(self) -> Starlette:
        app = super().app()
        app.router.routes.extend(
            [
                Route("/_fake/hits", self._hits, methods=["GET"]),
                Route("/_fake/reset", self._reset, methods=["POST"]),
            ]
        )
        return app

    async def _hits(self, request: Request) -> JSONResponse:
        return JSONResponse([dataclasses.asdict(h) for h in self.snapshot()])

    async def _reset(self, request: Request) -> JSONResponse:
        fields = await request.json()
        self.reset(Behaviour(**{k: v for k, v in fields.items() if k in _PLAIN}))
        return JSONResponse({"ok": True})


class FakeProviderProcess(ProviderUrls):
    """The parent's handle: the URLs an instance is given, and the control calls."""

    host = "127.0.0.1"

    def __init__(self, default: Behaviour | None = None) -> None:
        self.default = default or Behaviour()
        self.port = 0
        self._http: aiohttp.ClientSession | None = None

    @contextmanager
    def running(self) -> Iterator[FakeProviderProcess]:
        args = ("--delay", str(self.default.delay))
        with child_process("tests.fakes.provider_process", *args, what="the fake provider") as (_, first):
            self.port = int(first["port"])
            yield self

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession()
        return self._http

    async def areset(self, default: Behaviour | None = None) -> None:
        behaviour = default or Behaviour()
        fields = {k: getattr(behaviour, k) for k in _PLAIN}
        async with self._session().post(self.url + "/_fake/reset", json=fields) as r:
            r.raise_for_status()

    async def asnapshot(self) -> list[Hit]:
        async with self._session().get(self.url + "/_fake/hits") as r:
            r.raise_for_status()
            return [Hit(**h) for h in await r.json()]

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay", type=float, default=0.0, help="the default answer's delay (s)")
    args = ap.parse_args()
    with _Controlled(default=Behaviour(delay=args.delay)).running() as fake:
        print(json.dumps({"port": fake.port}), flush=True)
        sys.stdin.read()  # until the parent closes it (or dies)


if __name__ == "__main__":
    main()
