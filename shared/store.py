"""The job store: job metadata and per-image results in Redis.

Layout (all keys expire ``result_ttl`` seconds after the job's last write, so
Redis memory stays bounded):

``crackq:job:<id>``               hash: total, chunks, created_at, started_at, updated_at,
                                  finished_at, state (``queued`` or ``cancelled``), options, model
``crackq:job:<id>:results``       hash: image index -> JSON result record
``crackq:job:<id>:errors``        set of indexes whose record has an error
``crackq:job:<id>:tiles``         hash: image index -> JSON list of per-tile records
``crackq:job:<id>:failed_chunks`` set of chunk ids whose retries were exhausted
``crackq:job:<id>:deliveries``    hash: ``<chunk id>:<retry>`` -> times that attempt was started
``crackq:job:<id>:chunks``        hash: chunk id -> JSON items, for chunks not written yet (a chunk lost
                                  by Redis itself can be queued again: :meth:`JobStore.outstanding_chunks`)

Keys outside a job (see :mod:`shared.leases` and :mod:`shared.transport`):

``crackq:lease:<delivery tag>``   string with a TTL: the worker holding that delivered chunk is alive
``crackq:recovery:lock``          lock: one recovery pass at a time, across workers and producers
``crackq:dead_letters``           list: messages refused by workers (newest first, capped)

Kombu's own keys (``unacked``, ``unacked_index``, the queue lists) are named
by kombu's channel; crackq reads them only through it.

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

from shared.contract import finite

PREFIX = "crackq:job:"
LEASE_PREFIX = "crackq:lease:"
RECOVERY_LOCK = "crackq:recovery:lock"
DEAD_LETTERS = "crackq:dead_letters"
#: Dead letters kept (older ones are dropped): enough to diagnose, bounded memory.
DEAD_LETTERS_KEPT = 1000
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
local failed_chunk = ARGV[3]
local chunk = ARGV[4]
local n = tonumber(ARGV[5])
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
local pos = 6
if failed_chunk ~= '' then
  redis.call('SADD', KEYS[5], failed_chunk)
end
if chunk ~= '' then
  redis.call('HDEL', KEYS[6], chunk)
end
for i = 1, n do
  local index = tonumber(ARGV[pos])
  -- An index outside the job (a hand-made message) must not count towards its total.
  if index and index % 1 == 0 and index >= 0 and index < total and
     (failed_chunk == '' or redis.call('HEXISTS', KEYS[2], ARGV[pos]) == 0) then
    redis.call('HSET', KEYS[2], ARGV[pos], ARGV[pos + 1])
    if ARGV[pos + 2] == '1' then
      redis.call('SADD', KEYS[3], ARGV[pos])
    else
      redis.call('SREM', KEYS[3], ARGV[pos])
    end
  end
  pos = pos + 3
end
local m = tonumber(ARGV[pos])
pos = pos + 1
for i = 1, m do
  local index = tonumber(ARGV[pos])
  if index and index % 1 == 0 and index >= 0 and index < total then
    redis.call('HSET', KEYS[4], ARGV[pos], ARGV[pos + 1])
  end
  pos = pos + 2
end
redis.call('HSETNX', KEYS[1], 'started_at', now)
redis.call('HSET', KEYS[1], 'updated_at', now)
local done = redis.call('HLEN', KEYS[2])
if done >= total then
  redis.call('HSETNX', KEYS[1], 'finished_at', now)
end
for i = 1, 6 do redis.call('EXPIRE', KEYS[i], ttl) end
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


def deliveries_key(job_id: str) -> str:
    return PREFIX + job_id + ":deliveries"


def chunks_key(job_id: str) -> str:
    return PREFIX + job_id + ":chunks"


def lease_key(delivery_tag: str) -> str:
    return LEASE_PREFIX + delivery_tag


def _dumps(value) -> str:
    """Compact JSON of a record; NaN/inf become null (JSON has no such numbers)."""
    return json.dumps(finite(value), separators=(",", ":"), allow_nan=False)


def new_job_id() -> str:
    return uuid.uuid4().hex


class JobStore:
    """Reads and writes jobs; shared by producer (create, status, results) and workers (write)."""

    def __init__(self, client: redis.Redis, ttl: int):
        self.client = client
        self.ttl = ttl
        self._write = client.register_script(_WRITE_SCRIPT)

    # -- producer side -------------------------------------------------
    def create(self, job_id: str, total: int, chunks: int, options: dict, model: str = "",
               state: str = "queued") -> None:
        """Create the job; ``state="submitting"`` until :meth:`mark_queued` (its chunks are being sent)."""
        key = _keys(job_id)[0]
        now = time.time()
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, mapping={"id": job_id, "total": total, "chunks": chunks, "created_at": now,
                                "updated_at": now, "state": state, "options": json.dumps(options),
                                "model": model})
        pipe.expire(key, self.ttl)
        pipe.execute()

    def mark_queued(self, job_id: str) -> None:
        """Every chunk of a ``submitting`` job is on the queue: from now on it can finish."""
        key = _keys(job_id)[0]
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, mapping={"state": "queued", "updated_at": time.time()})
        pipe.expire(key, self.ttl)
        pipe.execute()

    def delete(self, job_id: str) -> None:
        """Remove a job and all its keys (a submit that was interrupted): workers then drop its chunks."""
        self.client.delete(*_keys(job_id), deliveries_key(job_id), chunks_key(job_id))

    def cancel(self, job_id: str) -> JobStatus:
        key = _keys(job_id)[0]
        if not self.client.exists(key):
            raise UnknownJob(job_id)
        status = self.status(job_id)
        if not status.finished:
            self.client.hset(key, mapping={"state": "cancelled", "updated_at": time.time()})
        return self.status(job_id)

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

    def remember_chunks(self, job_id: str, chunks: dict[str, list[dict]]) -> None:
        """Keep the items of chunks just queued until a worker writes them (see :meth:`outstanding_chunks`)."""
        if not chunks:
            return
        key = chunks_key(job_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, mapping={cid: json.dumps(items, separators=(",", ":")) for cid, items in chunks.items()})
        pipe.expire(key, self.ttl)
        pipe.execute()

    def outstanding_chunks(self, job_id: str) -> dict[str, list[dict]]:
        """Chunks queued for the job and not written yet, by chunk id."""
        return {cid: json.loads(raw) for cid, raw in self.client.hgetall(chunks_key(job_id)).items()}

    def write_results(self, job_id: str, records: dict[int, dict], tiles: dict[int, list] | None = None,
                      failed_chunk: str = "", chunk: str = "") -> int:
        """Store records by image index (overwriting); returns images done, or JOB_MISSING/JOB_CANCELLED.

        Indexes outside ``0..total-1`` are ignored.  With ``failed_chunk``, the
        records are error records of a chunk that gave up: they fill only the
        images still without a record, and the chunk joins ``failed_chunks`` in
        the same step, so a poller never sees the job ``done`` before ``failed``.
        """
        args: list = [self.ttl, time.time(), failed_chunk, chunk or failed_chunk, len(records)]
        for index, record in records.items():
            args += [index, _dumps(record), "1" if record.get("error") else "0"]
        tiles = tiles or {}
        args.append(len(tiles))
        for index, tile_records in tiles.items():
            args += [index, _dumps(tile_records)]
        return int(self._write(keys=[*_keys(job_id), chunks_key(job_id)], args=args))

    def fail_chunk(self, job_id: str, chunk_id: str, records: dict[int, dict]) -> int:
        """A chunk gave up (retries, time limit, deliveries): its error records and ``failed`` in one step."""
        return self.write_results(job_id, records, failed_chunk=chunk_id)

    def mark_chunk_failed(self, job_id: str, chunk_id: str) -> None:
        """A chunk exhausted its retries: the job ends as ``failed`` once every image has a record."""
        self.fail_chunk(job_id, chunk_id, {})

    def count_delivery(self, job_id: str, attempt: str) -> int:
        """Count one start of a chunk attempt (``<chunk id>:<retry>``); returns how many starts it has had.

        A chunk whose worker dies with it (OOM kill, segfault, machine loss) is
        delivered again; this count is what stops a chunk that kills every
        worker from looping for ever.
        """
        key = deliveries_key(job_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.hincrby(key, attempt, 1)
        pipe.expire(key, self.ttl)
        return int(pipe.execute()[0])

    # -- dead letters ----------------------------------------------------
    def dead_letters(self, limit: int = 100) -> list[dict]:
        """The newest refused messages (see :mod:`shared.transport`), newest first."""
        out = []
        for raw in self.client.lrange(DEAD_LETTERS, 0, max(0, limit - 1)):
            try:
                out.append(json.loads(raw))
            except ValueError:
                out.append({"reason": "unreadable dead letter", "message": raw[:200]})
        return out

    def clear_dead_letters(self) -> int:
        n = self.client.llen(DEAD_LETTERS)
        self.client.delete(DEAD_LETTERS)
        return n


def _derive_state(stored: str, total: int, done: int, failed_chunks: int, started_at) -> str:
    if stored in ("cancelled", "submitting"):
        return stored
    if done >= total:
        return "failed" if failed_chunks else "done"
    return "running" if (done or started_at) else "queued"


def _num(value) -> float | None:
    return None if value is None else float(value)


def push_dead_letter(client: redis.Redis, reason: str, message, queue: str = "") -> None:
    """Park a refused message (truncated to 4 KB) at the head of the dead-letter list, capped in length."""
    if isinstance(message, bytes):
        message = message.decode("utf-8", errors="replace")
    elif not isinstance(message, str):
        message = json.dumps(message, default=repr)
    entry = json.dumps({"at": time.time(), "queue": queue, "reason": reason[:300], "message": message[:4096]})
    pipe = client.pipeline(transaction=True)
    pipe.lpush(DEAD_LETTERS, entry)
    pipe.ltrim(DEAD_LETTERS, 0, DEAD_LETTERS_KEPT - 1)
    pipe.execute()
