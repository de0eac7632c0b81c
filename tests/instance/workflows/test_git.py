"""Reading a working tree for precommit/codereview: allowed roots, bad refs, git failures."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from common.errors import GitFailed, InvalidArgument
from instance.workflows.git import read_changes


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "a.py").write_text("x = 1\n")
    ident = ["-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "-C", str(root), "init", "-q"], check=True)
    subprocess.run(["git", "-C", str(root), *ident, "add", "a.py"], check=True)
    subprocess.run(["git", "-C", str(root), *ident, "commit", "-qm", "one"], check=True)
    (root / "a.py").write_text("x = 2\n")
    (root / "b.py").write_text("y = 1\n")
    subprocess.run(["git", "-C", str(root), "add", "b.py"], check=True)
    return root


async def test_staged_and_unstaged_changes(repo: Path) -> None:
    changes = await read_changes(str(repo), [repo.parent])
    assert {line[3:] for line in changes.changed_files} == {"a.py", "b.py"}
    assert "+y = 1" in changes.diffs["staged changes"]
    assert "+x = 2" in changes.diffs["unstaged changes"]
    only_staged = await read_changes(str(repo), [repo.parent], include_unstaged=False)
    assert list(only_staged.diffs) == ["staged changes"]
    against_head = await read_changes(str(repo), [repo.parent], compare_to="HEAD")
    assert "+x = 2" in against_head.diffs["diff against HEAD"]


async def test_refusals(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="outside the allowed roots"):
        await read_changes("/etc", [repo.parent])
    with pytest.raises(InvalidArgument, match="not a git ref"):
        await read_changes(str(repo), [repo.parent], compare_to="--output=/tmp/x")
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(GitFailed):
        await read_changes(str(plain), [tmp_path], compare_to="HEAD")
