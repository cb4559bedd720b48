"""When an open instance next needs time-driven work: the key of the storages' due index.

Three kinds of work come due, and the sweep (:mod:`triggers.sweep`) does them:

* **an owed dispatch** — a ``scheduled`` instance that has not started
  ``DISPATCH_GRACE`` seconds after it was scheduled (or after its start time):
  its message may have been lost (the process died between the commit and the
  send, the broker was down). The sweep sends it again, and again after twice
  as long, and so on: a queue that workers are slow to drain is not flooded.
  The run that starts it strikes it off.
* **a timer** — a ``scheduled`` instance whose start (``delay``, retry
  ``cooldown``, deadline) was further away than ``MAX_COUNTDOWN`` seconds when
  it was scheduled. Brokers cap how long a message may wait unacknowledged
  (RabbitMQ's ``consumer_timeout``, a Redis broker's ``visibility_timeout``),
  so it is kept in the store and handed to the broker ``MAX_COUNTDOWN`` seconds
  before its start, with a countdown below the cap.
* **an expired lease** — a ``running`` instance whose worker stopped renewing
  its lease (it died): it is taken over and sent again.

Failed instances have no due time: they wait for a human (replay, skip).
"""

from __future__ import annotations

from triggers.conf import setting
from triggers.types import STATUS_RUNNING, STATUS_SCHEDULED, TaskInstance

__all__ = ["CLAIM_SECONDS", "dispatch_grace", "due_at", "format_time", "max_countdown",
           "redispatch_backoff", "sent_later"]

#: Seconds a sweep's claim on due work lasts: another sweep does not take it meanwhile, and
#: work a sweep could not do (it failed, or died) comes back after that.
CLAIM_SECONDS = 60.0


def dispatch_grace() -> float:
    """``TRIGGERS['DISPATCH_GRACE']``: seconds a dispatch may take before it is owed again."""
    return float(setting("DISPATCH_GRACE"))


def max_countdown() -> float:
    """``TRIGGERS['MAX_COUNTDOWN']``: the longest countdown a message is sent with."""
    return float(setting("MAX_COUNTDOWN"))


def sent_later(instance: TaskInstance) -> bool:
    """Whether the instance's start was too far away to send it when it was scheduled:
    it waits in the store and the sweep sends it ``MAX_COUNTDOWN`` seconds before."""
    start = instance.start_after
    if start is None or "redispatch_at" in instance.metadata:
        return False
    scheduled = float(instance.metadata.get("scheduled", instance.metadata.get("modified", 0)))
    return start - scheduled > max_countdown()


def redispatch_backoff(sends: int) -> float:
    """Seconds until a dispatch sent ``sends`` times by the sweep is owed again."""
    return dispatch_grace() * float(2 ** min(max(sends, 0), 10))


def due_at(instance: TaskInstance) -> float | None:
    """When the sweep must next look at ``instance``; ``None``: never (by time)."""
    metadata = instance.metadata
    if instance.status == STATUS_RUNNING:
        lease = metadata.get("lease")
        return float(lease) if lease is not None else None
    if instance.status != STATUS_SCHEDULED:
        return None
    if "redispatch_at" in metadata:
        return float(metadata["redispatch_at"])
    start = instance.start_after
    if sent_later(instance):
        assert start is not None
        return round(start - max_countdown(), 3)
    scheduled = float(metadata.get("scheduled", metadata.get("modified", 0)))
    return round(max(scheduled, start or 0.0) + dispatch_grace(), 3)


def format_time(at: float) -> str:
    """Epoch seconds as a time people read, in the project's time zone
    (``2026-12-02 15:40:01.123 UTC``)."""
    import datetime

    from django.conf import settings
    from django.utils import timezone

    moment = datetime.datetime.fromtimestamp(float(at), tz=datetime.timezone.utc)
    moment = (timezone.localtime(moment) if settings.configured and settings.USE_TZ
              else moment.astimezone())
    return f"{moment:%Y-%m-%d %H:%M:%S}.{moment.microsecond // 1000:03d} {moment:%Z}"
