"""Settings: defaults, the users' variable names, and one-line errors for bad values."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from common.settings import load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # no .env from the developer's checkout
    for var in ("DATABASE_URL", "SUPABASE_DB_URL", "REDIS_URL", "EXAI_ROUTER_PORT", "EXAI_INSTANCES"):
        monkeypatch.delenv(var, raising=False)


def test_defaults_match_the_documented_ones() -> None:
    s = load_settings()
    assert (s.router_host, s.router_port, s.instances, s.max_instances) == ("127.0.0.1", 8079, 5, 16)
    assert s.glm_api_url == "https://api.z.ai/api/paas/v4"
    assert s.kimi_api_url == "https://api.moonshot.ai/v1"
    assert s.embedded_services


def test_supabase_db_url_is_accepted_as_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPABASE_DB_URL", "postgresql://u:p@db.example:6543/postgres")
    s = load_settings()
    assert s.database_url == "postgresql://u:p@db.example:6543/postgres"
    assert not s.embedded_services


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        ("EXAI_ROUTER_PORT", "eighty", "EXAI_ROUTER_PORT: Input should be a valid integer"),
        ("EXAI_ROUTER_PORT", "70000", "EXAI_ROUTER_PORT: Input should be less than or equal to 65535"),
        ("DATABASE_URL", "postgres://u:p@host:port/db", "DATABASE_URL: not a valid postgresql:// URL"),
        ("DATABASE_URL", "mysql://u@h/db", "DATABASE_URL: expected postgresql://"),
        ("REDIS_URL", "http://localhost:6379", "REDIS_URL: expected redis://"),
        ("EXAI_SPOOL_FULL_POLICY", "drop", "EXAI_SPOOL_FULL_POLICY: Input should be 'block' or 'refuse'"),
    ],
)
def test_bad_values_give_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(expected)


def test_secrets_are_not_echoed_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://user:hunter2@host:notaport/db")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "hunter2" not in str(err.value)


def test_more_instances_than_provisioned_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXAI_INSTANCES", "20")
    with pytest.raises(ConfigError, match="EXAI_INSTANCES=20 is more than EXAI_MAX_INSTANCES=16"):
        load_settings()
