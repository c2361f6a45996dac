"""Redis connections from one URL, with passwords kept out of logs.

``CRACKQ_REDIS_URL`` serves as both the Celery broker and the job store, so
one function turns it into a client and one function turns it into the
Celery/kombu options, and the TLS rules (``rediss://``) live only here.
"""

from __future__ import annotations

import re
import ssl
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from shared.config import Settings

_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED,
              "cert_none": ssl.CERT_NONE, "cert_optional": ssl.CERT_OPTIONAL, "cert_required": ssl.CERT_REQUIRED}


class RedisUnavailable(RuntimeError):
    """Redis cannot be reached or refuses us; the message is safe to show (no password)."""


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for logs and ``--json`` output)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    netloc = f"{user}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def ssl_options(url: str) -> dict | None:
    """``ssl`` options for a ``rediss://`` URL (query: ``ssl_cert_reqs``, ``ssl_ca_certs``, ...)."""
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    reqs = _CERT_REQS.get(query.get("ssl_cert_reqs", "required").lower(), ssl.CERT_REQUIRED)
    opts = {"ssl_cert_reqs": reqs}
    for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if key in query:
            opts[key] = query[key]
    return opts


def strip_ssl_query(url: str) -> str:
    """The URL without the ``ssl_*`` query parameters (kombu wants them as options instead)."""
    parts = urlsplit(url)
    query = [(k, v) for k, vs in parse_qs(parts.query).items() for v in vs if not k.startswith("ssl_")]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


def connect(url: str, *, check: bool = True, timeout: float = 5.0, retry_seconds: float | None = None) -> redis.Redis:
    """A Redis client; with ``check``, a PING turns connection and auth problems into clear errors.

    Once connected, commands ride over a lost connection for ``retry_seconds``
    (default: the ``redis_retry_seconds`` setting), so a Redis restart is a pause, not an error.
    """
    client = redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=timeout,
                                  socket_timeout=max(timeout, 30.0), health_check_interval=30,
                                  retry=Retry(NoBackoff(), 0))
    if check:
        ping(client, url)  # fails fast: a wrong URL or password is reported at once
    client.set_retry(ride_over_retry(Settings.load().redis_retry_seconds if retry_seconds is None else retry_seconds))
    return client


def ride_over_retry(seconds: float) -> Retry:
    """Retry a command on a lost connection with backoff (0.4, 0.8, 1.6, then 2 s steps) for ``seconds``.

    Only connection errors (``BusyLoadingError`` of a Redis loading its AOF
    included) are retried: a timeout may mean the command ran, and wrong
    passwords or bad commands are not transient.
    """
    backoff = ExponentialBackoff(cap=2.0, base=0.2)
    retries, waited = 0, 0.0
    while waited < seconds:
        retries += 1
        waited += backoff.compute(retries)
    return Retry(backoff, retries, supported_errors=(redis.ConnectionError,))


class RedisBusy(redis.ConnectionError):
    """Redis refused a write for a while: out of memory (``maxmemory``), a read-only replica after a
    failover (``READONLY``), or a failed snapshot (``MISCONF``).  Transient: retry with backoff."""


#: Replies of a Redis that will take the write again once an operator or a failover fixed it.  Inside a
#: Lua script they come wrapped ("Error running script ...: -OOM command not allowed ..."), from a
#: pipeline annotated ("Command # 1 (LPUSH ...) of pipeline caused error: ..."), and kombu wraps them
#: again in its OperationalError; redis-py drops the "OOM" code from the text of its own OutOfMemoryError.
_BUSY_REPLY = re.compile(r"(?:^|-)(?:OOM|READONLY|MISCONF|LOADING|MASTERDOWN|TRYAGAIN)\b"
                         r"|command not allowed when used memory|read only replica|MISCONF")


def is_busy(exc: BaseException | None) -> bool:
    """True for the Redis errors that mean "not now" rather than "never" (see :class:`RedisBusy`)."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError)):
            return True
        if _BUSY_REPLY.search(str(exc)):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def ping(client: redis.Redis, url: str) -> None:
    try:
        client.ping()
    except redis.AuthenticationError:
        raise RedisUnavailable(f"Redis at {mask_url(url)} refused the password (wrong or missing password)") from None
    except redis.ResponseError as exc:
        if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
            raise RedisUnavailable(f"Redis at {mask_url(url)} needs a password (wrong or missing password)") from None
        raise
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise RedisUnavailable(f"cannot reach Redis at {mask_url(url)}: {exc}") from None
