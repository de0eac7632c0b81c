"""Node packages that some tests drive (TypeScript SDK, Claude Code CLI, conformance suite).

Each lives in its own folder with a committed package.json and package-lock.json; the packages
are installed into that folder's node_modules on first use with `npm ci`. A test is skipped
only where `node` itself is not installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def installed(folder: Path, marker: str, *, timeout: float = 600) -> Path:
    """`folder / marker`, after `npm ci` in `folder` if the marker is not there yet."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    path = folder / marker
    if not path.exists():
        npm = shutil.which("npm")
        assert npm is not None, "node is installed but npm is not"
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=folder, check=True, timeout=timeout)
    assert path.exists(), f"npm ci in {folder} did not install {marker}"
    return path
