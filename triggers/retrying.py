"""Trying a storage step again when its store had a transient problem.

A lock held a little too long, a connection reset, a failover: the step was not
applied (or, for an ambiguous commit, the next attempt finds out whether it was),
and trying again later may succeed. A corrupt or missing session, bad input or a
missing table will not get better: those are raised at once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from triggers.exceptions import (
    CorruptSessionState,
    InstanceNotFound,
    InvalidArgument,
    LockNotReentrant,
    StorageError,
)

__all__ = ["GaveUp", "is_transient", "retry_transient"]

logger = logging.getLogger(__name__)

def is_transient(exc: BaseException) -> bool:
    """Whether a step that raised ``exc`` may succeed if tried again."""
    if isinstance(exc, (CorruptSessionState, InstanceNotFound, InvalidArgument,
                        LockNotReentrant)):
        return False
    if isinstance(exc, StorageError):
        # A missing or outdated table needs `manage.py migrate`, not patience.
        return "manage.py migrate" not in str(exc)
    try:
        import redis
    except ImportError:  # pragma: no cover - part of the redis extra
        return False
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError))


class GaveUp(Exception):  # noqa: N818 - a signal, not an error of its own
    """The step kept failing transiently for the whole bound; ``cause`` is the last error."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def retry_transient(action: Callable[[], Any], doing: str, bound: float,
                    while_retrying: Callable[[], AbstractContextManager[Any]] | None = None
                    ) -> Any:
    """``action()``, tried again on transient errors with back-off for up to ``bound``
    seconds; then :class:`GaveUp`. ``while_retrying()`` is entered around the retries
    (a run's heartbeat: its lease must not lapse meanwhile)."""
    deadline = time.monotonic() + bound
    try:
        return action()
    except Exception as exc:
        if not is_transient(exc):
            raise
        last = exc
    delay = 0.05
    with (while_retrying or nullcontext)():
        while True:
            if time.monotonic() + delay > deadline:
                raise GaveUp(last) from last
            logger.warning("Could not %s (%s: %s); trying again in %.2f s.", doing,
                           type(last).__name__, last, delay)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)
            try:
                return action()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                last = exc
