"""The job store: job metadata and per-image results in Redis.

Layout (all keys expire ``result_ttl`` seconds after the job's last write, so
Redis memory stays bounded):

``crackq:job:<id>``               hash: total, chunks, created_at, started_at, updated_at,
                                  finished_at, state (``queued`` or ``cancelled``), options, model
``crackq:job:<id>:results``       hash: image index -> JSON result record
``crackq:job:<id>:errors``        set of indexes whose record has an error
``crackq:job:<id>:tiles``         hash: image index -> JSON list of per-tile records
``crackq:job:<id>:failed_chunks`` set of chunk ids whose retries were exhausted

Results are keyed by image index, so a chunk delivered twice (its worker died
after writing) overwrites its own records instead of adding new ones; counts
are derived from the hash and set sizes, never incremented.  The write is one
Lua script that first checks the job still exists and is not cancelled, so
once ``cancel`` returns, no further results can appear.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Iterator

import redis

PREFIX = "crackq:job:"
STATES = ("queued", "running", "done", "cancelled", "failed")
FINISHED_STATES = ("done", "cancelled", "failed")

#: Returned by :meth:`JobStore.write_results` when the job is gone or cancelled.
JOB_MISSING = -1
JOB_CANCELLED = -2

_WRITE_SCRIPT = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
if state == 'cancelled' then return -2 end
local ttl = tonumber(ARGV[1])
local now = ARGV[2]
local n = tonumber(ARGV[3])
local pos = 4
for i = 1, n do
  redis.call('HSET', KEYS[2], ARGV[pos], ARGV[pos + 1])
  if ARGV[pos + 2] == '1' then
    redis.call('SADD', KEYS[3], ARGV[pos])
  else
    redis.call('SREM', KEYS[3], ARGV[pos])
  end
  pos = pos + 3
end
local m = tonumber(ARGV[pos])
pos = pos + 1
for i = 1, m do
  redis.call('HSET', KEYS[4], ARGV[pos], ARGV[pos + 1])
  pos = pos + 2
end
redis.call('HSETNX', KEYS[1], 'started_at', now)
redis.call('HSET', KEYS[1], 'updated_at', now)
local done = redis.call('HLEN', KEYS[2])
if done >= tonumber(redis.call('HGET', KEYS[1], 'total')) then
  redis.call('HSETNX', KEYS[1], 'finished_at', now)
end
for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ttl) end
return done
"""


class UnknownJob(KeyError):
    """No such job (never created, or expired after its TTL)."""

    def __str__(self) -> str:
        return f"unknown job {self.args[0]!r} (never submitted, or expired)"


@dataclass
class JobStatus:
    id: str
    state: str
    total: int
    done: int
    failed: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float | None
    failed_chunks: int
    model: str

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    def to_dict(self) -> dict:
        return asdict(self)


def _keys(job_id: str) -> list[str]:
    base = PREFIX + job_id
    return [base, base + ":results", base + ":errors", base + ":tiles", base + ":failed_chunks"]


def new_job_id() -> str:
    return uuid.uuid4().hex


class JobStore:
    """Reads and writes jobs; shared by producer (create, status, results) and workers (write)."""

    def __init__(self, client: redis.Redis, ttl: int):
        self.client = client
        self.ttl = ttl
        self._write = client.register_script(_WRITE_SCRIPT)

    # -- producer side -------------------------------------------------
    def create(self, job_id: str, total: int, chunks: int, options: dict, model: str = "") -> None:
        key = _keys(job_id)[0]
        now = time.time()
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, mapping={"id": job_id, "total": total, "chunks": chunks, "created_at": now,
                                "updated_at": now, "state": "queued", "options": json.dumps(options),
                                "model": model})
        pipe.expire(key, self.ttl)
        pipe.execute()

    def cancel(self, job_id: str) -> JobStatus:
        key = _keys(job_id)[0]
        if not self.client.exists(key):
            raise UnknownJob(job_id)
        status = self.status(job_id)
        if not status.finished:
            self.client.hset(key, mapping={"state": "cancelled", "updated_at": time.time()})
        return self.status(job_id)

    def exists(self, job_id: str) -> bool:
        return bool(self.client.exists(_keys(job_id)[0]))

    def status(self, job_id: str) -> JobStatus:
        key, results, errors, _tiles, failed_chunks = _keys(job_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(key)
        pipe.hlen(results)
        pipe.scard(errors)
        pipe.scard(failed_chunks)
        meta, done, failed, n_failed_chunks = pipe.execute()
        if not meta:
            raise UnknownJob(job_id)
        total = int(meta["total"])
        state = _derive_state(meta.get("state", "queued"), total, done, n_failed_chunks, meta.get("started_at"))
        return JobStatus(id=job_id, state=state, total=total, done=done, failed=failed,
                         created_at=float(meta["created_at"]), started_at=_num(meta.get("started_at")),
                         finished_at=_num(meta.get("finished_at")), updated_at=_num(meta.get("updated_at")),
                         failed_chunks=n_failed_chunks, model=meta.get("model", ""))

    def results(self, job_id: str, with_tiles: bool = False, page: int = 1000) -> Iterator[dict]:
        """Records in image order, each followed by its tile records if ``with_tiles``.

        Images not classified yet are left out, so results are readable mid-job.
        """
        status = self.status(job_id)
        _, results, _, tiles, _ = _keys(job_id)
        for start in range(0, status.total, page):
            fields = [str(i) for i in range(start, min(start + page, status.total))]
            pipe = self.client.pipeline(transaction=False)
            pipe.hmget(results, fields)
            if with_tiles:
                pipe.hmget(tiles, fields)
            pages = pipe.execute()
            tile_page = pages[1] if with_tiles else [None] * len(fields)
            for raw, raw_tiles in zip(pages[0], tile_page):
                if raw is None:
                    continue
                yield json.loads(raw)
                if raw_tiles is not None:
                    yield from json.loads(raw_tiles)

    def options(self, job_id: str) -> dict:
        raw = self.client.hget(_keys(job_id)[0], "options")
        if raw is None:
            raise UnknownJob(job_id)
        return json.loads(raw)

    # -- worker side ---------------------------------------------------
    def is_cancelled(self, job_id: str) -> bool:
        """True when the job was cancelled or no longer exists (expired): its chunks are dropped."""
        state = self.client.hget(_keys(job_id)[0], "state")
        return state is None or state == "cancelled"

    def write_results(self, job_id: str, records: dict[int, dict], tiles: dict[int, list] | None = None) -> int:
        """Store records by image index (overwriting); returns images done, or JOB_MISSING/JOB_CANCELLED."""
        args: list = [self.ttl, time.time(), len(records)]
        for index, record in records.items():
            args += [index, json.dumps(record, separators=(",", ":")), "1" if record.get("error") else "0"]
        tiles = tiles or {}
        args.append(len(tiles))
        for index, tile_records in tiles.items():
            args += [index, json.dumps(tile_records, separators=(",", ":"))]
        return int(self._write(keys=_keys(job_id), args=args))

    def mark_chunk_failed(self, job_id: str, chunk_id: str) -> None:
        """A chunk exhausted its retries: the job ends as ``failed`` once every image has a record."""
        key = _keys(job_id)[4]
        pipe = self.client.pipeline(transaction=True)
        pipe.sadd(key, chunk_id)
        pipe.expire(key, self.ttl)
        pipe.execute()


def _derive_state(stored: str, total: int, done: int, failed_chunks: int, started_at) -> str:
    if stored == "cancelled":
        return "cancelled"
    if done >= total:
        return "failed" if failed_chunks else "done"
    return "running" if (done or started_at) else "queued"


def _num(value) -> float | None:
    return None if value is None else float(value)
