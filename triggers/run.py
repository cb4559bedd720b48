"""The run protocol: how a runner executes one scheduled instance.

::

    run = Run.start(manager, "t_importSubject#0")   # None: a duplicate delivery
    if run is not None:
        try:
            result = do_the_work(run.instance)
        except Exception as exc:
            run.fail(exc)
        else:
            run.finish(result)

:meth:`Run.start` moves the instance from ``scheduled`` to ``running`` in one
atomic step (a compare-and-set) and gives the run a token; a delivery for an
instance that is not ``scheduled`` is a logged no-op. The run then records
exactly one outcome — :meth:`~Run.finish` (with its cascade, in the same step),
:meth:`~Run.fail`, :meth:`~Run.retry` or :meth:`~Run.skip` — and only while its
token is current: the outcome of a run that was recovered meanwhile is a logged
no-op. :class:`~triggers.task.TriggerTask` and custom runners use it.

Recording an outcome survives transient storage trouble: lock timeouts,
connection errors and conflicts are retried with back-off for up to
``TRIGGERS['OUTCOME_RETRY']`` seconds (default 60). A successful run is never
recorded as failed because of them; only a cascade the engine refuses (a loop of
outcome triggers) fails the instance. If the store stays unreachable longer,
the outcome is written to this machine's spool directory
(``TRIGGERS['OUTCOME_SPOOL']``) and recorded by :func:`flush_spool` — which every
run on this machine calls before it starts, as ``manage.py triggers recover``
does — never by running ``_run`` again.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from triggers import _json as stored_json
from triggers.conf import setting
from triggers.exceptions import (
    InstanceNotFound,
    InvalidTrigger,
    StorageError,
)
from triggers.retrying import GaveUp, is_transient, retry_transient
from triggers.storages.base import SessionStep, Want
from triggers.types import (
    DIRECTIVE_ON_COMPLETE,
    DIRECTIVE_ON_FAILURE,
    DIRECTIVE_ON_START,
    DIRECTIVE_ON_SUCCESS,
    STATUS_FAILED,
    STATUS_FINISHED,
    STATUS_RUNNING,
    STATUS_SCHEDULED,
    STATUS_SKIPPED,
    TaskInstance,
    TaskStatus,
    lease_expired,
    now,
)

if TYPE_CHECKING:
    from triggers.manager import TriggerManager

__all__ = ["Run", "flush_spool", "lease_expired", "lease_seconds", "spool_directory"]

logger = logging.getLogger(__name__)

Kwargs = dict[str, Any]


def lease_seconds() -> float:
    """``TRIGGERS['LEASE']``: seconds a running instance's lease lasts."""
    return float(setting("LEASE"))


def _close_connections() -> None:
    from django.conf import settings

    if settings.configured:
        from django.db import connections

        connections.close_all()


def spool_directory() -> Path:
    """Where outcomes wait that could not be recorded (``TRIGGERS['OUTCOME_SPOOL']``).

    By default a directory of the system's temporary directory named after the
    project's settings module, so that two projects on one machine keep apart.
    """
    configured = setting("OUTCOME_SPOOL")
    if configured:
        return Path(configured)
    project = os.environ.get("DJANGO_SETTINGS_MODULE") or "default"
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in project)
    return Path(tempfile.gettempdir()) / f"triggers-outcomes-{safe}"


#: A claimed spool file older than this is taken back (its flusher died).
STALE_CLAIM = 600.0


def _retrying(action: Callable[[], Any], doing: str,
              while_retrying: Callable[[], AbstractContextManager[Any]] | None = None) -> Any:
    """``action()`` with transient errors retried for ``TRIGGERS['OUTCOME_RETRY']`` s."""
    return retry_transient(action, doing, float(setting("OUTCOME_RETRY")), while_retrying)


class Run:
    """One run of an instance, from its start to its one recorded outcome."""

    def __init__(self, manager: TriggerManager, instance: TaskInstance) -> None:
        self.manager = manager
        #: The instance as it was when the run started (status ``running``).
        self.instance = instance

    @property
    def token(self) -> str:
        """This run's token: only the run that holds the current token records an outcome."""
        return str(self.instance.metadata.get("run"))

    # -- starting -----------------------------------------------------------------

    @classmethod
    def start(cls, manager: TriggerManager, name: str, task_id: str | None = None) -> Run | None:
        """``scheduled`` → ``running``, atomically, with a new run token and a lease (and
        ``task_id``, the Celery task id of the delivery that runs it, in the metadata).

        ``None`` for an instance that is not scheduled — unless it is ``running``
        and its lease expired (its worker died): then this run takes it over (the
        old run can no longer record an outcome).
        """
        flush_spool()
        storage = manager.storage
        taken_over: list[str] = []
        # What each attempt did, by the run token it wrote: when an attempt's reply was
        # lost, the next one may find the instance started by it.
        attempts: dict[str, tuple[TaskInstance, list[Any]]] = {}

        def start(step: SessionStep) -> tuple[TaskInstance | None, list[Any]]:
            instance = step.instance(name)
            taken_over.clear()
            earlier = attempts.get(str(instance.metadata.get("run")))
            if instance.status == STATUS_RUNNING and earlier is not None:
                return earlier
            if instance.status == STATUS_RUNNING and lease_expired(instance):
                taken_over.append(str(instance.metadata.get("run")))
                step.note(instance, "recovered")
            elif instance.status != STATUS_SCHEDULED:
                return None, []
            stamp = now()
            instance.set_status(STATUS_RUNNING, started=stamp, run=secrets.token_hex(4),
                                lease=round(stamp + lease_seconds(), 3),
                                attempts=int(instance.metadata.get("attempts", 0)) + 1)
            instance.metadata.pop("dispatch_error", None)
            if task_id:
                instance.metadata["task_id"] = task_id
            else:
                instance.metadata.pop("task_id", None)
            step.save(instance)
            manager.fire_outcome(step, instance, DIRECTIVE_ON_START, {"instance": instance.name})
            attempts[instance.metadata["run"]] = (instance.copy(), step.fired)
            return attempts[instance.metadata["run"]]

        try:
            started, fired = _retrying(lambda: storage.transact(start, Want(instances=[name])),
                                       f"start {name} in session {storage.uid!r}")
        except InstanceNotFound:
            logger.error("Cannot start %s: session %r does not have it (deleted, or expired "
                         "from its store); nothing was run.", name, storage.uid)
            raise
        except GaveUp as gave_up:
            raise gave_up.cause from None
        if started is None:
            logger.warning(
                "Ignoring a delivery of %s in session %r: it is not scheduled, nor running "
                "with an expired lease (a duplicate or late message); nothing changed.",
                name, storage.uid,
            )
            return None
        if taken_over:
            logger.warning("Taking over %s of session %r: the lease of run %s expired (its "
                           "worker died?); starting run %s.", name, storage.uid, taken_over[0],
                           started.metadata.get("run"))
        manager.after_step(fired)
        return cls(manager, started)

    # -- keeping the lease ------------------------------------------------------------

    def heartbeat(self) -> bool:
        """Renew this run's lease; ``False`` if the run is no longer current."""
        storage = self.manager.storage

        def renew(step: SessionStep) -> bool:
            instance = step.instance(self.instance.name)
            if instance.status != STATUS_RUNNING or instance.metadata.get("run") != self.token:
                return False
            instance.metadata["lease"] = round(now() + lease_seconds(), 3)
            step.save(instance)
            return True

        try:
            current: bool = storage.transact(renew, Want(instances=[self.instance.name]))
        except Exception:  # noqa: BLE001 - the next beat tries again; the lease may lapse
            logger.warning("Could not renew the lease of %s in session %r", self.instance.name,
                           storage.uid, exc_info=True)
            return True
        if not current:
            logger.warning("Run %s of %s in session %r is no longer current (recovered "
                           "meanwhile?); its outcome will be ignored.", self.token,
                           self.instance.name, storage.uid)
        return current

    @contextmanager
    def keep_alive(self) -> Iterator[None]:
        """Renew the lease every third of ``TRIGGERS['LEASE']`` while the block runs."""
        stop = threading.Event()
        interval = max(lease_seconds() / 3, 0.05)

        def beat() -> None:
            try:
                while not stop.wait(interval):
                    self.heartbeat()
            finally:
                _close_connections()

        thread = threading.Thread(target=beat, daemon=True,
                                  name=f"triggers-heartbeat:{self.instance.name}")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    # -- outcomes -------------------------------------------------------------------

    def finish(self, result: Mapping[str, Any], log_level: int = logging.NOTSET) -> None:
        """``running`` → ``finished`` and the cascade (the task's name fired with
        ``result``), in one atomic step."""
        result = dict(result)

        def finish(step: SessionStep, instance: TaskInstance) -> None:
            instance.set_status(STATUS_FINISHED, result=result, finished=now(),
                                log_level=max(log_level, instance.log_level))
            step.save(instance)
            self.manager.apply_trigger(step, instance.task_name, result)
            for directive in (DIRECTIVE_ON_SUCCESS, DIRECTIVE_ON_COMPLETE):
                self.manager.fire_outcome(step, instance, directive, result)

        try:
            self._record("finish", {"result": result, "log_level": log_level}, finish)
        except InvalidTrigger as exc:
            # The engine refused the cascade (outcome triggers that loop): the run
            # cannot finish; it fails, and _run is not repeated.
            logger.error("Could not finish %s of session %r: %s", self.instance.name,
                         self.manager.storage.uid, exc)
            self.fail(exc, max(log_level, logging.ERROR))

    def fail(self, exc: BaseException, log_level: int = logging.ERROR) -> None:
        """``running`` → ``failed`` with the exception; fires onFailure and onComplete."""
        from triggers.manager import failure_metadata

        meta = failure_metadata(exc)
        self._end(STATUS_FAILED, meta, log_level, outcome={
            "instance": self.instance.name, "exc_type": meta["exc_type"],
            "exc_message": meta["exc_message"]})

    def skip(self, metadata: Mapping[str, Any] | None = None,
             log_level: int = logging.NOTSET) -> None:
        """``running`` → ``skipped``, with ``metadata`` merged."""
        if self._end(STATUS_SKIPPED, {"finished": now(), **dict(metadata or {})}, log_level):
            self.manager.after_skip(self.instance, False)

    def retry(self, replacement_kwargs: Mapping[str, Kwargs] | None = None,
              cooldown: float | None = None, metadata: Mapping[str, Any] | None = None,
              log_level: int = logging.NOTSET, exc: BaseException | None = None
              ) -> TaskInstance | None:
        """``running`` → ``replayed``, and a copy (retry depth + 1) scheduled after ``cooldown``."""
        from triggers.manager import exception_name

        meta = dict(metadata or {})
        if exc is not None:
            meta["retry_reason"] = f"{exception_name(type(exc))}: {exc}"
        replacement = dict(replacement_kwargs) if replacement_kwargs is not None else None
        clones: dict[str, TaskInstance] = {}

        def retry(step: SessionStep, instance: TaskInstance) -> None:
            instance.metadata["log_level"] = max(log_level, instance.log_level)
            clones["latest"] = self.manager.replace_instance(
                step, instance, replacement, dict(meta), retry=True, cooldown=cooldown)

        recorded = self._record("retry", {"replacement_kwargs": replacement,
                                          "cooldown": cooldown, "metadata": meta,
                                          "log_level": log_level}, retry,
                                Want(counters=[self.instance.task_name]))
        if not recorded:
            return None
        # Once an attempt is applied no later one applies again: the latest clone is its.
        clone = clones["latest"]
        self.manager.storage.on_commit(lambda: self.manager.dispatch([clone]))
        return clone

    def _end(self, status: TaskStatus, metadata: Kwargs, log_level: int,
             outcome: Kwargs | None = None) -> bool:
        def end(step: SessionStep, instance: TaskInstance) -> None:
            instance.set_status(status, **{**metadata,
                                           "log_level": max(log_level, instance.log_level)})
            step.save(instance)
            if outcome is not None:
                for directive in (DIRECTIVE_ON_FAILURE, DIRECTIVE_ON_COMPLETE):
                    self.manager.fire_outcome(step, instance, directive, outcome)

        return self._record("end", {"status": status.value, "metadata": metadata,
                                    "log_level": log_level, "outcome": outcome}, end)

    # -- recording ------------------------------------------------------------------

    def _record(self, kind: str, payload: Kwargs,
                apply: Callable[[SessionStep, TaskInstance], None],
                want: Want | None = None) -> bool:
        """Apply an outcome in one step if this run is still current; retry transient
        errors; spool the outcome if the store stays unreachable. Whether it was
        recorded now (not spooled, not stale)."""
        storage = self.manager.storage
        prefetch = Want(instances=[self.instance.name], triggers=[self.instance.task_name])
        if want is not None:
            prefetch.counters |= want.counters
        # What each attempt fired, by its step's token: when an attempt's reply was lost
        # and the store could not say whether it was applied, the next attempt asks.
        attempts: dict[str, list[Any]] = {}
        unresolved: list[str] = []

        def step_function(step: SessionStep) -> list[Any] | None:
            self.manager.observe_step(step)
            instance = step.instance(self.instance.name)
            if instance.status != STATUS_RUNNING or instance.metadata.get("run") != self.token:
                return None
            apply(step, instance)
            attempts[step.token] = step.fired
            return step.fired

        def attempt() -> list[Any] | None:
            while unresolved:
                applied = storage.step_applied(unresolved[0])
                token = unresolved.pop(0)
                if applied:
                    return attempts[token]
            try:
                return storage.transact(step_function, prefetch)
            except StorageError as exc:
                if exc.step_token in attempts:
                    unresolved.append(exc.step_token)
                raise

        try:
            fired = _retrying(attempt, f"record the outcome of {self.instance.name} in "
                              f"session {storage.uid!r}", self.keep_alive)
        except InstanceNotFound:
            logger.error("The outcome (%s) of run %s of %s is lost: session %r does not "
                         "have the instance any more (deleted, or expired from its store).",
                         kind, self.token, self.instance.name, storage.uid)
            raise
        except GaveUp as gave_up:
            self._spool(kind, payload, gave_up.cause)
            return False
        if fired is None:
            logger.warning(
                "Not recording the outcome of run %s of %s in session %r: the instance was "
                "changed or recovered meanwhile.", self.token, self.instance.name, storage.uid,
            )
            return False
        self.manager.after_step(fired)
        return True

    def _spool(self, kind: str, payload: Kwargs, exc: BaseException) -> None:
        from triggers.manager import trigger_managers
        from triggers.storages import storage_backends

        storage = self.manager.storage
        record = {
            "manager": trigger_managers.key_for(type(self.manager)),
            "storage": storage_backends.key_for(type(storage)),
            "options": storage.get_options(), "uid": storage.uid,
            "instance": self.instance.name, "run": self.token, "kind": kind,
            "payload": payload, "at": now(),
        }
        directory = spool_directory()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{int(time.time() * 1000)}-{secrets.token_hex(4)}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(stored_json.dumps(record))
        temporary.replace(path)
        logger.error("Could not record the outcome (%s) of %s in session %r (%s: %s); it is "
                     "kept in %s and will be recorded once the store is back.", kind,
                     self.instance.name, storage.uid, type(exc).__name__, exc, path)

    @classmethod
    def _replay(cls, record: Mapping[str, Any]) -> None:
        """Record a spooled outcome (its run must still be current)."""
        from triggers.manager import build_manager

        manager = build_manager(record["manager"], record["storage"], record["uid"],
                                record["options"])
        instance = manager.storage[record["instance"]]
        if instance.status != STATUS_RUNNING or instance.metadata.get("run") != record["run"]:
            logger.warning("Dropping the spooled outcome of run %s of %s in session %r: the "
                           "instance was changed meanwhile.", record["run"], record["instance"],
                           record["uid"])
            return
        run = cls(manager, instance)
        payload = record["payload"]
        if record["kind"] == "finish":
            run.finish(payload["result"], payload["log_level"])
        elif record["kind"] == "retry":
            run.retry(payload["replacement_kwargs"], payload["cooldown"], payload["metadata"],
                      payload["log_level"])
        else:
            run._end(TaskStatus(payload["status"]), payload["metadata"], payload["log_level"],
                     payload["outcome"])


def flush_spool() -> int:
    """Record the outcomes this machine spooled while the store was unreachable; how many.

    One that can never be recorded (its session is gone or corrupt) moves to the
    ``failed`` subdirectory, logged, for a human to look at.
    """
    directory = spool_directory()
    if not directory.is_dir():
        return 0
    for stale in directory.glob("*.claimed"):
        try:
            if time.time() - stale.stat().st_mtime > STALE_CLAIM:
                stale.replace(stale.with_suffix(".json"))
        except OSError:
            continue
    done = 0
    for path in sorted(directory.glob("*.json")):
        claimed = path.with_suffix(".claimed")
        try:
            path.replace(claimed)  # one flusher per file
            claimed.touch()
        except OSError:
            continue
        try:
            Run._replay(stored_json.loads(claimed.read_text()))
        except Exception as exc:  # noqa: BLE001 - keep it for the next flush
            if is_transient(exc):
                claimed.replace(path)
                logger.warning("The store is still unreachable for the spooled outcome %s: %s",
                               path, exc)
                break
            failed = directory / "failed"
            failed.mkdir(exist_ok=True)
            claimed.replace(failed / path.name)
            logger.exception("Could not record the spooled outcome %s; it is kept in %s",
                             path, failed / path.name)
            continue
        claimed.unlink(missing_ok=True)
        done += 1
    return done
