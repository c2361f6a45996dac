"""Chunk leases: a chunk whose worker vanished goes back on the queue in seconds, not after an hour.

Why: with the Redis transport, a delivered chunk sits in kombu's ``unacked``
hash until it is acknowledged.  If the worker holding it dies with its main
process (kill -9 of the group, a lost machine, a reclaimed spot instance, an
OOM-killed container), nothing acknowledges or rejects it, and kombu puts it
back only after the visibility timeout (an hour by default, sized for slow
chunks of huge photos).  RabbitMQ redelivers at once when a consumer's
connection dies; this is the same idea over Redis, like Redis Streams'
``XAUTOCLAIM`` with an idle time.

Protocol (keys in :mod:`shared.store`):

1. **Lease.** Every ``CRACKQ_LEASE_SECONDS / 3`` the main process of each
   worker (the one that holds the delivered messages, :mod:`worker.leases`)
   sets ``crackq:lease:<delivery tag>`` with a TTL of ``CRACKQ_LEASE_SECONDS``
   for every message it holds and has not acknowledged: chunks running in
   its pool, and retries waiting for their countdown.
2. **Orphans.** A message in ``unacked_index`` delivered more than one lease
   ago whose lease key is gone has no live holder: every live holder renews
   well within a lease (three beats per lease).
3. **Recovery.** Under the lock ``crackq:recovery:lock`` (one pass at a time
   across every worker and producer), each orphan of the queue is moved back
   in one Redis transaction (``WATCH`` of the ``unacked`` hash and the lease
   key, so a renewal or an acknowledgement in between wins): removed from
   ``unacked``/``unacked_index`` and pushed to the front of its queue with
   kombu's own restore (``Channel._do_restore_message``), under a **new
   delivery tag**.  Removing the entry means the visibility timeout will not
   deliver it a second time; the new tag means a late acknowledgement by a
   holder that was only slow cannot remove the new delivery's entry.
   Every live worker runs recovery every half lease; ``crackq wait`` and
   ``crackq status`` run it too, so a job recovers even with no idle worker.

Failure cases (see docs/reliability.md): a holder frozen for longer than a
lease (a stopped VM, a long GC pause) has its chunk run a second time, which
costs CPU only (results are keyed by image index); while Redis itself is down
nothing is renewed or recovered, and leases that expired meanwhile make
recovery re-run the chunks in flight once Redis is back (duplicates, not
losses).  A chunk that keeps killing its workers is stopped by the per-chunk
delivery count (``CRACKQ_MAX_DELIVERIES``, in the task).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Iterable

import redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from shared.store import RECOVERY_LOCK, lease_key

log = logging.getLogger(__name__)


def renew(client: redis.Redis, delivery_tags: Iterable[str], holder: str, lease_seconds: float) -> int:
    """Renew the leases of ``delivery_tags`` (held by ``holder``) for ``lease_seconds``; returns how many."""
    tags = list(delivery_tags)
    if not tags:
        return 0
    pipe = client.pipeline(transaction=False)
    for tag in tags:
        pipe.set(lease_key(tag), holder, px=int(lease_seconds * 1000))
    pipe.execute()
    return len(tags)


def recover(channel, queue: str, lease_seconds: float, now: float | None = None) -> list[str]:
    """Put back every chunk of ``queue`` whose lease expired; returns the new delivery tags.

    ``channel`` is a kombu Redis channel (its client, key names and restore
    are kombu's).  Returns at once with ``[]`` when another pass holds the lock.
    """
    client = channel.client
    lock = client.lock(RECOVERY_LOCK, timeout=max(10.0, 2 * lease_seconds), blocking=False)
    if not lock.acquire(blocking=False):
        return []
    try:
        ceiling = (time.time() if now is None else now) - lease_seconds
        candidates = client.zrangebyscore(channel.unacked_index_key, "-inf", ceiling)
        restored = []
        for tag in candidates:
            tag = bytes_to_str(tag)
            new_tag = _restore_orphan(channel, tag, queue)
            if new_tag:
                restored.append(new_tag)
        if restored:
            log.warning("recovered %d chunk(s) of queue %r whose worker stopped renewing its lease",
                        len(restored), queue)
        return restored
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:
            pass  # expired while we worked: harmless, every step is a transaction of its own


def _restore_orphan(channel, tag: str, queue: str) -> str | None:
    """Move one orphaned message from ``unacked`` to the front of its queue; None if it is not one."""
    client = channel.client
    lease = lease_key(tag)
    new_tag = []

    def transaction(pipe):
        if pipe.exists(lease):
            return  # its holder renewed it: alive
        raw = pipe.hget(channel.unacked_key, tag)
        if raw is None:
            return  # acknowledged or restored meanwhile
        message, exchange, routing_key = loads(bytes_to_str(raw))
        if routing_key != queue:
            return  # another queue's: its own workers recover it
        fresh = uuid.uuid4().hex
        message["properties"]["delivery_tag"] = fresh
        pipe.multi()
        pipe.zrem(channel.unacked_index_key, tag)
        pipe.hdel(channel.unacked_key, tag)
        channel._do_restore_message(message, exchange, routing_key, pipe, leftmost=False)
        new_tag.append(fresh)

    client.transaction(transaction, channel.unacked_key, lease)
    return new_tag[0] if new_tag else None


def recover_with(app, queue: str, lease_seconds: float) -> list[str]:
    """:func:`recover` over a connection of the Celery ``app`` of its own (producer side, or a worker thread)."""
    with app.connection_for_write() as connection:
        return recover(connection.default_channel, queue, lease_seconds)
