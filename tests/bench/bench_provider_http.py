"""The provider client's own cost: what a chat's provider request adds beyond the provider's time.

    python tests/bench/bench_provider_http.py [--calls 200] [--delay 0.05] [--stream]

On the instances' event loop (uvloop, common/eventloop.py). The fake provider runs in a process
of its own (tests/fakes/provider_process.py) and answers after --delay seconds. Three clients
take turns call by call, on one kept-alive connection each:

- `http1`: the instance's provider client as it calls providers (instance/providers/base.py
  over instance/providers/http1.py), `chat()` whole: the body's encoding, the retry loop, the
  request, the answer's stream parsed into a ChatResult;
- `aiohttp`: the same `chat()` with its requests through aiohttp's client (the path kept for
  HTTP(S) proxies; what every request took until 2026-11-28);
- `floor`: one prebuilt request written on a plain asyncio connection, the answer parsed by
  httptools and its events by json.loads; no retry loop, no result: what any client must do.

Per call: client-observed time minus the fake's own (from the request's first bytes reaching
its server to the answer's last byte handed to it), split into the send side (call start to
the fake's first byte) and the receive side (the fake's last byte to the call's return).
Prints p50s and saves JSON to tests/bench/results/provider-http-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httptools  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common.eventloop import loop_factory  # noqa: E402
from common.settings import load_settings  # noqa: E402
from instance.providers.base import ChatRequest  # noqa: E402
from instance.providers.glm import GLMProvider  # noqa: E402
from instance.providers.models import lookup  # noqa: E402
from tests.fakes.provider import GLM_PATH, Behaviour  # noqa: E402
from tests.fakes.provider_process import FakeProviderProcess  # noqa: E402

CLIENTS = ("http1", "aiohttp", "floor")


class _Floor(asyncio.Protocol):
    """The least a client does: write the request, parse the answer's HTTP."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[bytes] | None = None
        self.body: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.done is not None
        self.done.set_result(b"".join(self.body))


async def _floor_call(transport: asyncio.Transport, proto: _Floor, path: bytes, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    proto.parser = httptools.HttpResponseParser(proto)
    proto.body = []
    proto.done = asyncio.get_running_loop().create_future()
    transport.write(
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (path, len(data), data)
    )
    answer = await proto.done
    for line in answer.split(b"\n"):
        if line.startswith(b"data: {"):
            json.loads(line[6:])


def _p50(values: list[float]) -> float:
    return round(statistics.median(values), 3) if values else float("nan")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    fake = FakeProviderProcess(Behaviour(delay=args.delay))
    with fake.running():
        settings = load_settings(glm_api_key="k", glm_api_url=fake.glm_url)
        direct = GLMProvider(base_url=fake.glm_url, api_key="k", settings=settings)
        through = GLMProvider(base_url=fake.glm_url, api_key="k", settings=settings)
        through.through_aiohttp = True
        model = lookup("glm-4.6")
        assert model is not None
        loop = asyncio.get_running_loop()
        transport, floor = await loop.create_connection(_Floor, "127.0.0.1", fake.port)
        path = f"{GLM_PATH}/chat/completions".encode()
        stamps: dict[str, list[tuple[str, float, float]]] = {c: [] for c in CLIENTS}
        for i in range(args.calls + 5):  # the first 5 rounds warm the connections up
            order = CLIENTS[i % 3 :] + CLIENTS[: i % 3]
            for client in order:
                text = f"call {i} {client}"
                messages = [{"role": "user", "content": text}]
                started = time.monotonic()
                if client == "floor":
                    body = {"model": "glm-4.6", "messages": messages, "stream": args.stream}
                    await _floor_call(transport, floor, path, body)
                else:
                    provider = direct if client == "http1" else through
                    await provider.chat(ChatRequest(model=model, messages=messages, stream=args.stream))
                if i >= 5:
                    stamps[client].append((text, started, time.monotonic()))
                await asyncio.sleep(0.005)
        hits = {h.body["messages"][-1]["content"]: h for h in await fake.asnapshot()}
        transport.close()
        await direct.aclose()
        await through.aclose()
        await fake.aclose()
    out: dict[str, Any] = {}
    for client, rows in stamps.items():
        extra, send, receive = [], [], []
        for text, started, ended in rows:
            hit = hits.get(text)
            if hit is None or hit.arrived is None or hit.sent is None:
                continue
            extra.append((ended - started - (hit.sent - hit.arrived)) * 1000)
            send.append((hit.arrived - started) * 1000)
            receive.append((ended - hit.sent) * 1000)
        out[client] = {
            "added_p50_ms": _p50(extra),
            "send_p50_ms": _p50(send),
            "receive_p50_ms": _p50(receive),
            "n": len(extra),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200, help="measured calls per client")
    ap.add_argument("--delay", type=float, default=0.05, help="the fake provider's answer delay (s)")
    ap.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True, help="streamed answers")
    args = ap.parse_args()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:  # the instances' loop (uvloop)
        results = runner.run(run(args))
    print(f"{'client':10} {'added p50 ms':>13} {'send p50':>9} {'receive p50':>12} {'n':>5}")
    for client, r in results.items():
        sides = f"{r['send_p50_ms']:9.3f} {r['receive_p50_ms']:12.3f}"
        print(f"{client:10} {r['added_p50_ms']:13.3f} {sides} {r['n']:5}")
    saved = {
        "results": results,
        "meta": {"calls": args.calls, "delay": args.delay, "stream": args.stream, "load": os.getloadavg()},
    }
    where = ROOT / "tests" / "bench" / "results"
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"provider-http-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(saved, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
