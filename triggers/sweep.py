"""The sweep: every piece of time-driven work, found through the storages' due index.

One pass (:func:`sweep`) records the outcomes this machine spooled while the
store was unreachable, then asks the storage for the sessions whose work is due
(:meth:`~triggers.storages.base.StorageContract.due_sessions`) and does it
(:meth:`triggers.manager.TriggerManager.sweep`): owed dispatches sent again,
timers handed to the broker, expired leases taken over (see
:mod:`triggers.timers`). Its cost is that of the due work, not of the number of
sessions, on the database and Redis storages (their due index); other storages
look at every session.

Run it every few seconds, with Celery beat::

    CELERY_BEAT_SCHEDULE = {"triggers-sweep": {"task": "triggers.sweep", "schedule": 5.0}}

or, without beat, ``manage.py triggers sweep --loop``. Two sweeps at once double
nothing: a session's work is one atomic step, and what one sweep sent is not
due for the other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from triggers.exceptions import InvalidArgument
from triggers.types import now

__all__ = ["SweepReport", "sweep", "sweep_forever"]

logger = logging.getLogger(__name__)

#: Sessions one pass looks at, at most (the rest wait for the next pass).
DEFAULT_LIMIT = 1000


@dataclass
class SweepReport:
    """What one pass did."""

    #: Sessions the due index handed to the pass.
    sessions: int = 0
    #: ``(session, instance, kind)`` of each instance sent: ``redispatched``, ``timer``
    #: or ``takeover``.
    sent: list[tuple[str, str, str]] = field(default_factory=list)
    #: Spooled outcomes recorded.
    outcomes: int = 0
    #: ``(session, error)`` for each session the pass could not sweep (tried next time).
    errors: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        kinds: dict[str, int] = {}
        for _uid, _name, kind in self.sent:
            kinds[kind] = kinds.get(kind, 0) + 1
        done = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())) or "nothing sent"
        text = f"Swept {self.sessions} session(s): {done}; {self.outcomes} spooled outcome(s)"
        return text + (f"; {len(self.errors)} session(s) failed" if self.errors else "") + "."


def sweep(storage: str | None = None, *, limit: int = DEFAULT_LIMIT, manager: str | None = None,
          **storage_options: Any) -> SweepReport:
    """One pass over the due work of the storage ``storage`` (default
    ``TRIGGERS['STORAGE']`` with its options, then ``storage_options``), with the manager
    ``manager`` (default ``TRIGGERS['MANAGER']``)."""
    from triggers.conf import triggers_settings
    from triggers.manager import build_manager
    from triggers.run import flush_spool
    from triggers.storages import storage_backends

    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidArgument(f"limit must be a whole number >= 1, got {limit!r}")
    key = storage or triggers_settings.STORAGE
    options = {**triggers_settings.storage_options(key), **storage_options}
    report = SweepReport(outcomes=flush_spool())
    until = now()
    backend = storage_backends.get_class(key)
    try:
        due = list(backend.due_sessions(until, limit, **options))
    except NotImplementedError as exc:
        raise InvalidArgument(
            f"The {key!r} storage keeps no due index and cannot list its sessions ({exc}): "
            "the sweep cannot find its due work. Give it due_sessions() or session_uids().",
        ) from exc
    for uid in due:
        report.sessions += 1
        try:
            session = build_manager(manager or triggers_settings.MANAGER, key, uid, options)
            sent, dues = session.sweep()
            session.storage.swept(dues, until)
        except Exception as exc:  # noqa: BLE001 - the claim lapses: the next pass tries again
            logger.exception("Could not sweep session %r", uid)
            report.errors.append((uid, f"{type(exc).__name__}: {exc}"))
            continue
        report.sent += [(uid, instance.name, kind) for instance, kind in sent]
    if report.sent or report.outcomes or report.errors:
        logger.info("%s", report)
    return report


def sweep_forever(interval: float | None = None, storage: str | None = None,
                  passes: int | None = None, *, limit: int = DEFAULT_LIMIT,
                  manager: str | None = None,
                  on_pass: Callable[[SweepReport | Exception], None] | None = None,
                  **storage_options: Any) -> None:
    """:func:`sweep` every ``interval`` seconds (``TRIGGERS['SWEEP_INTERVAL']``), forever
    or ``passes`` times. A pass that fails (the store or the broker unreachable) is
    logged and the next one runs all the same; database connections that broke are
    closed between passes (as Celery does between tasks), so the next pass opens new
    ones. ``on_pass`` gets each pass's report, or the exception that ended it."""
    from django.db import close_old_connections

    from triggers.conf import triggers_settings

    pause = float(interval if interval is not None else triggers_settings.SWEEP_INTERVAL)
    done = 0
    while passes is None or done < passes:
        started = time.monotonic()
        close_old_connections()
        outcome: SweepReport | Exception
        try:
            outcome = sweep(storage, limit=limit, manager=manager, **storage_options)
        except Exception as exc:  # noqa: BLE001 - the store may be back next time
            logger.exception("The sweep failed; trying again in %.1f s", pause)
            outcome = exc
        if on_pass is not None:
            on_pass(outcome)
        done += 1
        if passes is None or done < passes:
            time.sleep(max(pause - (time.monotonic() - started), 0.0))
