"""Router-minted session ids: valid header values that are safe to paste into `exai` commands."""

from __future__ import annotations

import re

import pytest

from router import sessions


def test_a_session_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # One id in 64 drawn by token_urlsafe starts with "-", which argparse reads as an option
    # in `exai links add GROUP ID` and `exai sessions end ID`.
    monkeypatch.setattr(sessions.secrets, "token_urlsafe", lambda n: "-" + "A" * 31)
    assert sessions.new_session_id() == "_" + "A" * 31


def test_session_ids_are_unique_url_safe_header_values() -> None:
    ids = [sessions.new_session_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{31}", sid) for sid in ids)
