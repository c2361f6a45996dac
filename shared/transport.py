"""kombu's Redis transport, made to survive any entry on the queue.

Why: kombu pops a queue entry and decodes it inside the worker's event loop;
an entry that is not JSON (``JSONDecodeError``), a JSON value that is not a
message envelope (``TypeError``), or an envelope that Celery's consumer then
chokes on (a body of the wrong shape: ``ValueError``) escapes the loop, and
Celery stops the worker with ``Unrecoverable error``.  The entry that killed
it is restored and redelivered, so every worker that picks it up dies too.

This subclass changes one method, the read of a ``BRPOP`` reply, and keeps
everything else (priorities, ack emulation, reconnects) kombu's own:

* an entry that is not a kombu envelope is **parked** in the dead-letter list
  (:data:`shared.store.DEAD_LETTERS`, shown by ``crackq dead-letters``) and
  dropped: it was already popped, so nothing is redelivered;
* any other exception raised while the consumer handles a message (a bug, a
  body that Celery cannot parse) parks the message, removes it from kombu's
  ``unacked`` hash and lets the loop go on: a message can cost itself, never
  the worker.

Connection errors still propagate: they are kombu's signal to reconnect.
Finer checks (only crackq's own tasks, arguments of the contract's shape)
live in :mod:`worker.consumer`, which refuses such messages before they reach
this last line of defence.

Installed by :func:`register` (called by :func:`shared.celery_config.make_celery`) as
the transport of ``redis://`` and ``rediss://`` URLs, kombu's own extension
point (``TRANSPORT_ALIASES``), so URLs, logs and TLS handling stay kombu's.
"""

from __future__ import annotations

import json
import logging
from typing import Callable

import kombu.transport
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str

from shared.store import push_dead_letter

log = logging.getLogger(__name__)

#: Called with a short reason for every refused message (the worker counts them in its metrics).
REFUSAL_HOOKS: list[Callable[[str], None]] = []


def envelope_problem(payload) -> str:
    """Why ``payload`` (decoded JSON) is not a kombu message envelope; "" when it is one."""
    if not isinstance(payload, dict):
        return f"not a message envelope (a JSON {type(payload).__name__})"
    properties = payload.get("properties")
    if not isinstance(properties, dict) or not isinstance(properties.get("delivery_tag"), str):
        return "message envelope without properties.delivery_tag"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or "exchange" not in info or "routing_key" not in info:
        return "message envelope without properties.delivery_info"
    if not isinstance(payload.get("headers", {}) or {}, dict):
        return "message headers are not an object"
    if not isinstance(payload.get("body", ""), str):
        return "message body is not a string"
    return ""


def refused(client, reason: str, raw, queue: str) -> None:
    """Log, count and park one refused message; never raises (the consumer must go on)."""
    log.error("refused a message on queue %r: %s (parked in the dead-letter list)", queue, reason)
    for hook in REFUSAL_HOOKS:
        try:
            hook(reason.split(":")[0])
        except Exception:  # noqa: BLE001 - metrics must not break consuming
            log.debug("refusal hook failed", exc_info=True)
    try:
        push_dead_letter(client, reason, raw, queue)
    except Exception as exc:  # noqa: BLE001 - Redis trouble: the message is dropped, the log keeps it
        log.error("could not park the refused message: %s: %s", type(exc).__name__, exc)


class Channel(kombu_redis.Channel):
    """kombu's Redis channel whose ``BRPOP`` read refuses bad entries instead of raising."""

    def _brpop_read(self, **options):
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise kombu_redis.Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            self._deliver_safely(item, dest)
            return True
        finally:
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def _deliver_safely(self, item, queue: str) -> None:
        raw = bytes_to_str(item)
        try:
            payload = json.loads(raw)
        except ValueError as exc:
            refused(self.client, f"undecodable: not JSON ({exc})", raw, queue)
            return
        problem = envelope_problem(payload)
        if problem:
            refused(self.client, f"malformed: {problem}", raw, queue)
            return
        try:
            self.connection._deliver(payload, queue)
        except self.connection_errors:
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence of the consumer loop
            log.exception("handling a message failed")
            refused(self.client, f"unhandled: {type(exc).__name__}: {str(exc)[:200]}", raw, queue)
            self._forget(payload["properties"]["delivery_tag"])

    def _forget(self, delivery_tag: str) -> None:
        """Drop a refused message from kombu's unacknowledged set (else it is redelivered in an hour)."""
        try:
            self.qos.reject(delivery_tag, requeue=False)
        except Exception:  # noqa: BLE001 - it may never have been appended
            try:
                self.qos._remove_from_indices(delivery_tag).execute()
            except Exception:  # noqa: BLE001
                log.warning("could not drop refused message %s from the unacked set", delivery_tag)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport (``redis://``, ``rediss://``, ``unix://``) with :class:`Channel`."""

    Channel = Channel


#: URL schemes served by :class:`Transport`.
SCHEMES = ("redis", "rediss")


def register() -> None:
    """Make :class:`Transport` the transport of ``redis://`` and ``rediss://`` URLs in this process."""
    target = f"{__name__}:Transport"
    for scheme in SCHEMES:
        if kombu.transport.TRANSPORT_ALIASES.get(scheme) != target:
            kombu.transport.TRANSPORT_ALIASES[scheme] = target
            kombu.transport._transport_cache.pop(scheme, None)  # resolved before: resolve again
