"""Tables of the database storage backend (:mod:`triggers.storages.database`)."""

from __future__ import annotations

from django.db import models

from triggers import _json as stored_json
from triggers.types import RESOLVED_STATUSES, TaskStatus

__all__ = ["TriggerEvent", "TriggerIdempotencyKey", "TriggerInstance", "TriggerLock",
           "TriggerSession"]

STATUS_CHOICES = [(status.value, status.value) for status in TaskStatus]


class TriggerSession(models.Model):
    """One session: its per-session fields and its configuration (JSON)."""

    uid = models.CharField(max_length=255, primary_key=True)
    #: Configuration version, counters, latest kwargs, metadata, open instances (the
    #: per-session record of triggers.storages.base.SessionRecord).
    state = models.JSONField(default=dict, encoder=stored_json.Encoder, decoder=stored_json.Decoder)
    #: The configuration (read only when this process has not parsed its version yet).
    config = models.JSONField(default=dict, encoder=stored_json.Encoder,
                              decoder=stored_json.Decoder)
    created = models.DateTimeField(auto_now_add=True)
    modified = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "trigger session"
        ordering = ["-modified"]

    def __str__(self) -> str:
        return self.uid


class TriggerInstance(models.Model):
    """One task instance of a session."""

    session = models.ForeignKey(TriggerSession, on_delete=models.CASCADE,
                                related_name="instances")
    name = models.CharField(max_length=255)
    task_name = models.CharField(max_length=255)
    number = models.PositiveIntegerField()
    status = models.CharField(max_length=16, choices=STATUS_CHOICES)
    #: Whether the status is finished, abandoned, replayed or skipped.
    resolved = models.BooleanField(default=False)
    #: Whether it waits for triggers (unstarted): what a fired trigger reads.
    waiting = models.BooleanField(default=False)
    #: Whether it is scheduled with a delay (read by the task's ``unless`` triggers only).
    delayed = models.BooleanField(default=False)
    kwargs = models.JSONField(default=dict, encoder=stored_json.Encoder,
                              decoder=stored_json.Decoder)
    metadata = models.JSONField(default=dict, encoder=stored_json.Encoder,
                                decoder=stored_json.Decoder)
    #: The ``unless`` triggers that reached the instance (TaskInstance.abandon_state).
    unless = models.JSONField(default=list)
    #: When the sweep must next look at it (epoch seconds; see triggers.timers), or null.
    due = models.FloatField(null=True, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    modified = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "trigger instance"
        ordering = ["session", "task_name", "number"]
        constraints = [
            models.UniqueConstraint(fields=["session", "name"], name="triggers_instance_unique"),
        ]
        indexes = [
            # Only the open instances of a session are read on the hot path: a partial
            # index holds just those, so the read does not grow with the history.
            models.Index(fields=["session"], condition=models.Q(resolved=False),
                         name="triggers_instance_open"),
            # A fired trigger reads the waiting instances of the tasks that react to it.
            models.Index(fields=["session", "task_name"], condition=models.Q(waiting=True),
                         name="triggers_instance_waiting"),
            models.Index(fields=["session", "task_name"], condition=models.Q(delayed=True),
                         name="triggers_instance_delayed"),
            models.Index(fields=["status"], name="triggers_instance_status"),
            # The due index of the sweep: only instances with time-driven work.
            models.Index(fields=["due"], condition=models.Q(due__isnull=False),
                         name="triggers_instance_due"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def is_resolved(self) -> bool:
        return self.status in {status.value for status in RESOLVED_STATUSES}


class TriggerLock(models.Model):
    """An expiring named lock of the database storage (e.g. a session's hook lock)."""

    name = models.CharField(max_length=255, primary_key=True)
    #: The holder's random token.
    owner = models.CharField(max_length=64)
    #: Epoch seconds after which the lock is free, unless its holder renewed it.
    expires = models.FloatField()

    class Meta:
        verbose_name = "trigger lock"

    def __str__(self) -> str:
        return self.name


class TriggerEvent(models.Model):
    """One event of a session's history (bounded by ``TRIGGERS['HISTORY_LIMIT']``)."""

    session = models.ForeignKey(TriggerSession, on_delete=models.CASCADE, related_name="events")
    #: Position in the session's history.
    seq = models.PositiveBigIntegerField()
    data = models.JSONField(encoder=stored_json.Encoder, decoder=stored_json.Decoder)

    class Meta:
        verbose_name = "trigger event"
        constraints = [
            models.UniqueConstraint(fields=["session", "seq"], name="triggers_event_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.session_id}:{self.seq}"


class TriggerIdempotencyKey(models.Model):
    """What a fire with an idempotency key scheduled (``fire(..., idempotency_key=...)``)."""

    session = models.ForeignKey(TriggerSession, on_delete=models.CASCADE,
                                related_name="idempotency_keys")
    key = models.CharField(max_length=255)
    #: Names of the instances the fire scheduled.
    result = models.JSONField(default=list)

    class Meta:
        verbose_name = "trigger idempotency key"
        constraints = [
            models.UniqueConstraint(fields=["session", "key"], name="triggers_idempotency_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.session_id}:{self.key}"
