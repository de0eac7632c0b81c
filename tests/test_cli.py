"""`exai` as a user runs it: bad configuration gives one line that says what to fix."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ports import free_port, free_port_block

EXAI = [sys.executable, "-c", "import sys; from common.fleet.cli import main; sys.exit(main())"]


def exai(*args: str, env: dict[str, str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EXAI, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A clean environment: no EXAI_*/service variables from the caller, a temp state folder."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("EXAI_") and "_URL" not in k}
    base.update(
        EXAI_STATE_DIR=str(tmp_path / "state"),
        EXAI_ROUTER_PORT=str(free_port()),
        EXAI_INSTANCE_BASE_PORT=str(free_port_block(2)),
        EXAI_MAX_INSTANCES="2",
        EXAI_INSTANCES="1",
    )
    return base


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("exai: error: ")
    for needle in needles:
        assert needle in lines[0]


def test_unparsable_database_url(env: dict[str, str], tmp_path: Path) -> None:
    env["DATABASE_URL"] = "postgresql://user@host:notaport/db"
    assert_one_line_error(exai("up", env=env), "DATABASE_URL", "not a valid")
    assert not (tmp_path / "state" / "supervisor.sock").exists()


def test_port_in_use_is_refused_before_supervisord_starts(
    env: dict[str, str], tmp_path: Path, pg_dsn: str, redis_url: str
) -> None:
    env.update(DATABASE_URL=pg_dsn, REDIS_URL=redis_url)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env["EXAI_ROUTER_PORT"] = str(busy.getsockname()[1])
        assert_one_line_error(exai("up", env=env), "EXAI_ROUTER_PORT", "already in use")
    assert not (tmp_path / "state" / "supervisor.sock").exists()


def test_unreachable_redis(env: dict[str, str], pg_dsn: str) -> None:
    env.update(DATABASE_URL=pg_dsn, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert_one_line_error(exai("up", env=env), "REDIS_URL", "cannot reach Redis")


def test_unreachable_postgres(env: dict[str, str], redis_url: str) -> None:
    env.update(DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/x", REDIS_URL=redis_url)
    assert_one_line_error(exai("up", env=env), "DATABASE_URL", "cannot connect to Postgres")


def test_bad_number(env: dict[str, str]) -> None:
    env["EXAI_INSTANCES"] = "five"
    assert_one_line_error(exai("status", env=env), "EXAI_INSTANCES")


def test_status_and_scale_when_down(env: dict[str, str]) -> None:
    status = exai("status", env=env)
    assert status.returncode == 3
    assert "not running" in status.stdout
    assert_one_line_error(exai("scale", "1", env=env), "not running", "exai up")


def test_db_migrate(env: dict[str, str], pg_dsn: str) -> None:
    env["DATABASE_URL"] = pg_dsn
    result = exai("db", "migrate", env=env)
    assert result.returncode == 0, result.stderr
    assert "schema version" in result.stdout


def test_env_example_documents_every_setting() -> None:
    from pydantic import AliasChoices

    from common import PROJECT_ROOT
    from common.settings import Settings

    text = (PROJECT_ROOT / ".env.example").read_text()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        var = alias.choices[0] if isinstance(alias, AliasChoices) else alias
        assert f"# {var}=" in text, f"{var} ({name}) is missing from .env.example"
