"""Django signals sent by the trigger manager, after the change they report is durable.

Both are sent with ``sender`` = the manager's class (``TriggerManager``,
``FinalizingTriggerManager``, your subclass) and always by keyword; connect a
receiver with ``**kwargs`` so that arguments added later do not break it::

    from django.dispatch import receiver

    from triggers.signals import instance_status_changed, trigger_fired

    @receiver(trigger_fired)
    def on_trigger_fired(sender, session, trigger_name, trigger_kwargs, scheduled, **kwargs):
        ...

    @receiver(instance_status_changed)
    def on_status_changed(sender, session, instance, old_status, new_status, **kwargs):
        ...

They are sent *after commit*: once the atomic step that made the change has
been written, and — inside the caller's ``transaction.atomic()``
(``ATOMIC_REQUESTS`` included) — once that transaction commits; never for a
step or transaction that was rolled back. Within one step,
``instance_status_changed`` comes first, then ``trigger_fired`` for every
trigger the step applied, in order, and only then are the scheduled instances
handed to their runner, so that one process sees the statuses of an instance in
order. Each signal is sent in the process (and thread) that made the change: a
Celery worker sends those of the runs it executes. They are sent with
``send_robust()``: a receiver that raises is logged by Django (logger
``django.dispatch``) and stops neither the other receivers nor the dispatch of
the instances. Nothing is computed while no receiver is connected.
"""

from __future__ import annotations

from django.dispatch import Signal

__all__ = ["instance_status_changed", "trigger_fired"]

#: Sent for every trigger applied in a session: a fire, a cascade (a finished
#: instance fires its task's name), an outcome trigger (``onReady`` …).
#:
#: Arguments: ``session`` (the session UID), ``trigger_name``, ``trigger_kwargs``
#: (the kwargs applied: a dict), ``scheduled`` (the list of
#: :class:`~triggers.types.TaskInstance` the trigger scheduled, possibly empty) and
#: ``manager`` (the :class:`~triggers.manager.TriggerManager` that applied it).
trigger_fired = Signal()

#: Sent for every status change of a task instance made through the manager or the
#: run protocol (:mod:`triggers.run`): created (``old_status`` ``None``), scheduled,
#: running, finished, failed, abandoned, replayed, skipped …
#:
#: Arguments: ``session`` (the session UID), ``instance`` (a copy of the
#: :class:`~triggers.types.TaskInstance` as the step left it), ``old_status`` (a
#: :class:`~triggers.types.TaskStatus`, or ``None`` for an instance the step
#: created), ``new_status`` (a :class:`~triggers.types.TaskStatus`) and ``manager``.
instance_status_changed = Signal()
