"""Fixtures for the instance tests: the fake provider, real `exai-instance` processes, MCP clients.

Everything is real except the LLM: instances are subprocesses started exactly as supervisord
would start them (env only), talking to this run's Postgres and Redis and to the fake provider
on loopback; clients are the `mcp` SDK's `Client` in either protocol era.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from common.protocol import INTERNAL_METRICS, INTERNAL_TOKEN_HEADER, SESSION_HEADER
from tests import loopstalls
from tests.fakes.provider import FakeProvider
from tests.ports import free_port

INTERNAL_TOKEN = "test-internal-" + secrets.token_hex(8)
ERAS = ["legacy", "2026-07-28"]

_SCRUB = (
    "EXAI_",
    "GLM_",
    "KIMI_",
    "ZHIPUAI_",
    "MOONSHOT_",
    "DATABASE_URL",
    "SUPABASE_",
    "REDIS_URL",
    "DEFAULT_MODEL",
)


@pytest.fixture(scope="session")
def fake_provider() -> Iterator[FakeProvider]:
    with FakeProvider().running() as fake:
        yield fake


@pytest.fixture
def fake(fake_provider: FakeProvider) -> Iterator[FakeProvider]:
    """The shared fake provider, reset to instant answers before and after each test."""
    fake_provider.reset()
    yield fake_provider
    fake_provider.reset()


@dataclass
class InstanceProc:
    """One running `exai-instance` subprocess."""

    id: str
    port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, timeout: float = 20.0) -> InstanceProc:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "instance.main"],
            env=self.env,
            cwd=self.log_path.parent,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"instance {self.id} exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(
                    self.url + "/internal/health", headers={INTERNAL_TOKEN_HEADER: INTERNAL_TOKEN}, timeout=1
                )
                if r.status_code == 200 and r.json()["state"] == "ready":
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"instance {self.id} did not become ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def internal(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {INTERNAL_TOKEN_HEADER: INTERNAL_TOKEN, **kwargs.pop("headers", {})}
        return httpx.request(method, self.url + path, headers=headers, timeout=10, **kwargs)


def metrics_of(inst: InstanceProc) -> dict[str, float]:
    """The instance's own metrics (`/internal/metrics`), unlabelled samples by name."""
    resp = inst.internal("GET", INTERNAL_METRICS)
    assert resp.status_code == 200, resp.text
    return {
        name: float(value)
        for name, _, value in (line.partition(" ") for line in resp.text.splitlines())
        if name and not name.startswith("#") and "{" not in name
    }


@pytest.fixture(scope="session")
def instance_base_env(
    pg_dsn: str,
    redis_url: str,
    redis_prefix: str,
    fake_provider: FakeProvider,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:
    files = tmp_path_factory.mktemp("allowed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB)}
    env.update(
        {
            "DATABASE_URL": pg_dsn,
            "REDIS_URL": redis_url,
            "EXAI_REDIS_PREFIX": redis_prefix,
            "EXAI_INTERNAL_TOKEN": INTERNAL_TOKEN,
            "GLM_API_KEY": "test-glm-key",
            "GLM_API_URL": fake_provider.glm_url,
            "KIMI_API_KEY": "test-kimi-key",
            "KIMI_API_URL": fake_provider.kimi_url,
            "DEFAULT_MODEL": "glm-4.6",
            "EXAI_PROVIDER_MAX_RETRIES": "2",
            "EXAI_PROVIDER_RETRY_BUDGET": "8",
            "EXAI_PROVIDER_READ_TIMEOUT": "4",
            "EXAI_PROVIDER_CONNECT_TIMEOUT": "2",
            "EXAI_HEARTBEAT_INTERVAL": "0.5",
            "EXAI_HEARTBEAT_TTL": "2",
            "EXAI_DRAIN_TIMEOUT": "10",
            "EXAI_DB_ACQUIRE_TIMEOUT": "1",
            "EXAI_DB_COMMAND_TIMEOUT": "2",
            "EXAI_ALLOWED_ROOTS": str(files),
            "EXAI_LOG_LEVEL": "INFO",
            "EXAI_LOOP_STALL_MS": f"{loopstalls.TEST_STALL_MS:g}",  # stalls: see tests/loopstalls.py
            "EXAI_LOOP_AUDIT": "true",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@pytest.fixture(scope="session")
def allowed_root(instance_base_env: dict[str, str]) -> Path:
    return Path(instance_base_env["EXAI_ALLOWED_ROOTS"])


SpawnInstance = Callable[..., InstanceProc]


@contextlib.contextmanager
def _spawner(base_env: dict[str, str], root: Path) -> Iterator[SpawnInstance]:
    started: list[InstanceProc] = []

    def spawn(name: str | None = None, **env_overrides: str | None) -> InstanceProc:
        iid = name or f"t{secrets.token_hex(3)}"
        home = root / iid
        home.mkdir(parents=True, exist_ok=True)
        port = free_port()
        env = dict(base_env)
        env.update(
            {"EXAI_INSTANCE_ID": iid, "EXAI_INSTANCE_PORT": str(port), "EXAI_STATE_DIR": str(home / "state")}
        )
        for key, value in env_overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        inst = InstanceProc(id=iid, port=port, env=env, log_path=home / "instance.log")
        started.append(inst)
        return inst.start()

    try:
        yield spawn
    finally:
        for inst in started:
            inst.stop()
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
        for inst in started:
            loopstalls.collected.extend(loopstalls.read_stalls(inst.log_path.parent, test))


@pytest.fixture(scope="session")
def session_spawner(
    instance_base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SpawnInstance]:
    with _spawner(instance_base_env, tmp_path_factory.mktemp("instances")) as spawn:
        yield spawn


@pytest.fixture
def spawn_instance(instance_base_env: dict[str, str], tmp_path: Path) -> Iterator[SpawnInstance]:
    """Start extra instances for one test (stopped at its end)."""
    with _spawner(instance_base_env, tmp_path) as spawn:
        yield spawn


@pytest.fixture(scope="session")
def instance_a(session_spawner: SpawnInstance) -> InstanceProc:
    return session_spawner("inst_a")


@pytest.fixture(scope="session")
def instance_b(session_spawner: SpawnInstance) -> InstanceProc:
    return session_spawner("inst_b")


@contextlib.asynccontextmanager
async def connect(
    inst: InstanceProc, mode: str, *, session: str | None = None, token: str = INTERNAL_TOKEN
) -> AsyncIterator[Client]:
    """An SDK client to `inst` as the router would forward it (internal token, session header)."""
    headers = {INTERNAL_TOKEN_HEADER: token}
    if session is not None:
        headers[SESSION_HEADER] = session
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(60.0))
    async with http:
        try:
            transport = streamable_http_client(inst.url + "/mcp", http_client=http)
            async with Client(transport, mode=mode) as client:  # type: ignore[arg-type]
                yield client
        finally:
            if session is not None:
                # As the router does when a session ends: an instance bound to one session
                # refuses the next one until it is reset in that session's name.
                with contextlib.suppress(httpx2.HTTPError):
                    await http.post(inst.url + "/internal/reset")


def new_session() -> str:
    return "s_" + secrets.token_hex(8)
