"""The docs say what the code does (issue 14, point 10)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from common import PROJECT_ROOT
from common.errors import InvalidArgument
from common.fleet.cli import provider_keys_line, supervisorctl_command
from common.settings import load_settings
from instance.tools.files import read_files


def _tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    return [PROJECT_ROOT / line for line in out.stdout.splitlines() if line]


def test_no_file_cites_design_documents_outside_the_repository() -> None:
    offenders = []
    for path in _tracked_files():
        if path.suffix not in (".md", ".py", ".sql", ".toml", ".example", ".yaml", ".yml", ".conf", ".txt"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if "DESIGN" + ".md" in text or "CRAFT" + ".md" in text:
            offenders.append(str(path.relative_to(PROJECT_ROOT)))
    assert offenders == []


def test_empty_allowed_roots_means_files_are_refused_and_the_docs_say_so(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(InvalidArgument, match="EXAI_ALLOWED_ROOTS"):
        asyncio.run(read_files([str(tmp_path / "a.txt")], []))
    example = (PROJECT_ROOT / ".env.example").read_text()
    block = example.split("# EXAI_ALLOWED_ROOTS=")[0].rsplit("\n\n", 1)[-1]
    assert "refused" in block and "no restriction" not in block


def test_docs_count_remaining_turns_as_messages() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    context = (PROJECT_ROOT / "docs" / "CONTEXT_ENGINEERING" / "README.md").read_text()
    assert "21st call" not in context and "11th call" in context
    assert "each `chat` call adds two" in readme


def test_readme_supervisorctl_line_works_without_the_venv_active() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    lines = [ln.strip() for ln in readme.splitlines() if "supervisorctl -c" in ln]
    assert lines and all(ln.startswith(".venv/bin/supervisorctl") for ln in lines), lines
    assert Path(supervisorctl_command()).is_absolute()  # what `exai up` prints


def test_exai_up_names_the_provider_keys_it_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for var in ("GLM_API_KEY", "ZHIPUAI_API_KEY", "KIMI_API_KEY", "MOONSHOT_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    assert provider_keys_line(load_settings()).startswith("none found")
    monkeypatch.setenv("GLM_API_KEY", "k")
    line = provider_keys_line(load_settings())
    assert "found GLM_API_KEY" in line and "KIMI_API_KEY not set" in line
    assert "Provider keys:" in (PROJECT_ROOT / "common" / "fleet" / "cli.py").read_text()
