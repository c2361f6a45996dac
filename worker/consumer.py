"""The worker's Celery consumer: only crackq's own tasks, with arguments of the contract's shape, get in.

Why: Celery hands a message's body to the pool only after its main process
has unpacked it; a body of the wrong shape (a JSON string instead of
``[args, kwargs, embed]``) raises in the main process and stops the worker,
and the message comes back for the next one.  Celery also registers built-in
tasks (``celery.chord_unlock``, ``celery.backend_cleanup``, ...) that anyone
who can write to the queue could call.  This consumer checks each message
before Celery's own handler sees it and refuses (logs, counts, parks in the
dead-letter list, acknowledges) anything that is not a well-formed
``crackq.*`` task.  What passes is still checked in the task itself (options,
items: :func:`shared.contract.ChunkOptions.from_dict`, :func:`shared.contract.check_items`),
where a bad value becomes error records rather than a refusal.

Non-JSON content (pickle, ...) is left to Celery's handler, which refuses it
without deserializing (``accept_content``); entries that are not messages at
all are refused one layer down, by :mod:`shared.transport`.
"""

from __future__ import annotations

import logging

from celery.worker.consumer import Consumer
from vine import promise

from shared.contract import TASK_NAME
from shared.transport import refused

log = logging.getLogger(__name__)

#: The only tasks a crackq worker runs.
ALLOWED_TASKS = frozenset({TASK_NAME})
JSON = "application/json"


def task_problem(headers, body) -> str:
    """Why a decoded task message is not a crackq task call; "" when it is one."""
    if not isinstance(headers, dict) or "task" not in headers:
        return "refused: not a Celery protocol-2 task message"
    name = headers.get("task")
    if name not in ALLOWED_TASKS:
        return f"refused: task {str(name)[:100]!r} is not a crackq task"
    if not isinstance(body, (list, tuple)) or len(body) != 3:
        return "malformed: task body is not [args, kwargs, embed]"
    args, kwargs, embed = body
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict) or not isinstance(embed, (dict, type(None))):
        return "malformed: task body is not [args, kwargs, embed]"
    return _arguments_problem(list(args), kwargs)


def _arguments_problem(args: list, kwargs: dict) -> str:
    names = ("job_id", "items", "options")
    if len(args) > len(names) or set(kwargs) - set(names) or set(names[:len(args)]) & set(kwargs):
        return "malformed: arguments do not match classify_chunk(job_id, items, options)"
    bound = dict(zip(names, args), **kwargs)
    if not isinstance(bound.get("job_id"), str) or not bound["job_id"]:
        return "malformed: job_id is not a string"
    if not isinstance(bound.get("items"), list):
        return "malformed: items is not a list"
    if not isinstance(bound.get("options"), (dict, type(None))):
        return "malformed: options is not an object"
    return ""


class SafeConsumer(Consumer):
    """Celery's consumer with :func:`task_problem` checked before every task message is handled."""

    def create_task_handler(self, promise=promise):
        handle = super().create_task_handler(promise=promise)

        def on_task_received(message):
            if message.content_type == JSON:
                try:
                    problem = task_problem(message.headers, message.decode())
                except Exception as exc:  # noqa: BLE001 - a body that does not decode
                    problem = f"undecodable: {type(exc).__name__}: {str(exc)[:200]}"
                if problem:
                    return self._refuse(message, problem)
            return handle(message)

        return on_task_received

    def _refuse(self, message, problem: str) -> None:
        queue = (message.delivery_info or {}).get("routing_key", "")
        raw = getattr(message, "_raw", None) or {"headers": message.headers, "body": str(message.body)[:4096]}
        refused(message.channel.client, problem, raw, queue)
        message.reject_log_error(log, self.connection_errors)
