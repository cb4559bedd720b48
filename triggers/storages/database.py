"""Session state in the Django database (SQLite, PostgreSQL …): the embedded default.

Tables (:mod:`triggers.models`): one row per session holding the per-session
fields (configuration version, counters, latest kwargs, metadata) as JSON and
the configuration, one row per task instance (flagged *waiting* and *resolved*,
with partial indexes on both), and one row per history event. A step is one
database transaction that starts by updating the session's row — which takes
its row lock (and, on SQLite, the database's write lock), so steps on one
session queue up instead of conflicting — then reads the session row and only
the instances it needs (for a fired trigger: the waiting instances of the tasks
that react to it), decides, and writes the rows that changed. Neither the
session's history nor its failed instances are read by ``fire()``, so its cost
depends on neither.

Dispatch waits for the transaction to commit (``transaction.on_commit``): called
inside an outer transaction (``ATOMIC_REQUESTS``, ``transaction.atomic()``),
instances are handed to the runner only once that transaction commits.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from triggers.exceptions import InvalidArgument, LockError, LockTimeout, StorageError
from triggers.locking import DEFAULT_LOCK_EXPIRE, DEFAULT_LOCK_TIMEOUT, BaseLock
from triggers.storages import _records as records
from triggers.storages.base import (
    RecordStorage,
    SessionRecord,
    SessionStep,
    history_limit,
    idempotency_limit,
)
from triggers.timers import CLAIM_SECONDS, due_at

__all__ = ["DatabaseLock", "DatabaseStorageBackend"]

logger = logging.getLogger(__name__)

#: History rows are trimmed to the limit once per this many events.
_TRIM_EVERY = 100


class DatabaseStorageBackend(RecordStorage):
    """Keeps a session's state in the Django database ``using`` (default ``default``).

    Add ``"triggers"`` to ``INSTALLED_APPS`` and run ``manage.py migrate``.
    """

    name = "db"

    def __init__(self, uid: str, using: str = "default", lock_expire: int = DEFAULT_LOCK_EXPIRE,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        super().__init__(uid, lock_expire=lock_expire, lock_timeout=lock_timeout)
        from django.conf import settings

        if using not in settings.DATABASES:
            raise InvalidArgument(
                f"Unknown database alias {using!r} for session {uid!r}; configured aliases: "
                f"{', '.join(sorted(settings.DATABASES))}", session_uid=uid,
            )
        self.using = using

    def get_options(self) -> dict[str, Any]:
        return {"using": self.using, "lock_expire": self.lock_expire,
                "lock_timeout": self.lock_timeout}

    def _where(self) -> str:
        return f"database {self.using!r}"

    # -- models ---------------------------------------------------------------

    @staticmethod
    def _models() -> tuple[Any, Any, Any]:
        from triggers.models import TriggerEvent, TriggerInstance, TriggerSession

        return TriggerSession, TriggerInstance, TriggerEvent

    def _failed(self, exc: Exception, doing: str) -> StorageError:
        text = str(exc).strip()
        lowered = text.lower()
        if ("no such table" in lowered or "no such column" in lowered  # SQLite
                or (("relation" in lowered or "column" in lowered)
                    and "does not exist" in lowered)  # PostgreSQL
                or ("table" in lowered and "doesn't exist" in lowered)  # MySQL, MariaDB
                or "unknown column" in lowered):
            # Only the first line: the rest (PostgreSQL's "LINE 1: SELECT …") is noise here.
            first = text.splitlines()[0] if text else text
            command = "manage.py migrate" + (
                f" --database {self.using}" if self.using != "default" else "")
            return StorageError(
                f"Database {self.using!r} failed while {doing} session {self.uid!r}: "
                f"{type(exc).__name__}: {first}. The tables of triggers are missing or out of "
                f"date: run `{command}`", session_uid=self.uid,
            )
        return StorageError(
            f"Database {self.using!r} failed while {doing} session {self.uid!r}: "
            f"{type(exc).__name__}: {exc}", session_uid=self.uid,
        )

    @contextmanager
    def _reading(self) -> Iterator[None]:
        from django.db import DatabaseError

        try:
            yield
        except DatabaseError as exc:
            self._drop_broken_connection()
            raise self._failed(exc, "reading") from exc

    # -- atomic steps ---------------------------------------------------------

    def exclusive(self) -> Any:
        """One transaction holding the session's row lock; nothing is written on error."""
        return self._session_transaction()

    def _session_lock(self) -> Any:
        return self._session_transaction()


    @contextmanager
    def _session_transaction(self) -> Iterator[None]:
        from django.db import DatabaseError, OperationalError

        locked = False
        restore: Callable[[], None] = lambda: None  # noqa: E731
        try:
            restore = self._scope_lock_wait()
            with transaction.atomic(using=self.using):
                self._lock_row()
                locked = True
                yield
        except OperationalError as exc:
            if not locked and _is_lock_timeout(exc):
                raise LockTimeout(
                    f"Could not lock session {self.uid!r} in database {self.using!r} within "
                    f"{self.lock_timeout} s; another transaction holds it.",
                    session_uid=self.uid,
                ) from exc
            self._drop_broken_connection()
            raise self._failed(exc, "changing") from exc
        except DatabaseError as exc:
            self._drop_broken_connection()
            raise self._failed(exc, "changing") from exc
        finally:
            try:
                restore()
            except DatabaseError:
                self._drop_broken_connection()

    def _drop_broken_connection(self) -> None:
        """Close this alias's connection if it broke (a restart, a failover), so that the
        next step opens a new one; not inside the caller's transaction."""
        from django.db import connections

        connection = connections[self.using]
        if not connection.in_atomic_block:
            connection.close_if_unusable_or_obsolete()

    def _scope_lock_wait(self) -> Callable[[], None]:
        """Wait at most ``lock_timeout`` for the session's lock, in this step only.

        SQLite's ``busy_timeout`` belongs to the connection and PostgreSQL's
        ``SET LOCAL lock_timeout`` to the outermost transaction: both are set back
        to what they were when the step ends, so that later queries of a shared
        connection (or of the caller's transaction) keep their own wait.
        """
        from django.db import connections

        connection = connections[self.using]
        wait_ms = max(int(self.lock_timeout * 1000), 1)
        connection.ensure_connection()
        if connection.vendor == "sqlite":
            raw = connection.connection
            previous = raw.execute("PRAGMA busy_timeout").fetchone()[0]
            raw.execute(f"PRAGMA busy_timeout = {wait_ms}")

            def restore_sqlite() -> None:
                if connection.connection is raw:  # not closed meanwhile (a failed step)
                    raw.execute(f"PRAGMA busy_timeout = {int(previous)}")

            return restore_sqlite
        if connection.vendor == "postgresql":
            outer = connection.in_atomic_block
            with connection.cursor() as cursor:
                cursor.execute("SHOW lock_timeout")
                previous = cursor.fetchone()[0]

            def restore() -> None:
                # Our own transaction ended, and SET LOCAL with it; inside the caller's
                # transaction put its value back (unless it is being rolled back anyway).
                if outer and connection.in_atomic_block and not connection.needs_rollback:
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT set_config('lock_timeout', %s, true)",
                                       [previous])

            return restore
        return lambda: None

    def _lock_row(self) -> None:
        from django.db import connections

        connection = connections[self.using]
        if connection.vendor == "postgresql":
            wait_ms = max(int(self.lock_timeout * 1000), 1)
            with connection.cursor() as cursor:
                cursor.execute(f"SET LOCAL lock_timeout = {wait_ms}")
        session_model = self._models()[0]
        rows = session_model.objects.using(self.using).filter(uid=self.uid)
        if rows.update(modified=timezone.now()):
            return
        try:
            with transaction.atomic(using=self.using):
                session_model.objects.using(self.using).create(uid=self.uid, state={})
        except IntegrityError:
            pass  # created by a concurrent step meanwhile
        rows.update(modified=timezone.now())

    joins_transactions = True

    def joins_transaction(self, alias: str) -> bool:
        return alias == self.using

    def on_commit(self, callback: Callable[[], None]) -> None:
        # Robust: a failing callback registered before (a hook, any of the app's) must not
        # drop the dispatches of later steps of the same transaction.
        transaction.on_commit(callback, using=self.using, robust=True)

    def _hook_lock(self) -> BaseLock:
        return DatabaseLock(self.using, f"hooks:{self.uid}", self.uid, self.lock_expire,
                            self.lock_timeout)

    # -- records ----------------------------------------------------------------

    def _read_session(self) -> SessionRecord | None:
        with self._reading():
            state = (self._models()[0].objects.using(self.using).filter(uid=self.uid)
                     .values_list("state", flat=True).first())
        if not state:
            return None
        if not isinstance(state, dict):
            raise records.corrupt(self.uid, self._where(), "the session row is not an object")
        try:
            return SessionRecord(state)
        except ValueError as exc:
            raise records.corrupt(self.uid, self._where(), str(exc)) from exc

    def _read_config(self) -> Any:
        with self._reading():
            rows = list(self._models()[0].objects.using(self.using).filter(uid=self.uid)
                        .values_list("config", flat=True)[:1])
        return rows[0] if rows else None

    def _rows(self, **filters: Any) -> list[tuple[str, Any, str]]:
        with self._reading():
            rows = list(self._models()[1].objects.using(self.using)
                        .filter(session_id=self.uid, **filters).order_by()
                        .values_list("name", "status", "kwargs", "metadata", "unless",
                                     "waiting", "delayed", "resolved"))
        return [(name, {"status": status, "kwargs": kwargs, "meta": meta, "unless": unless},
                 records.PLACE_WAITING if waiting else records.PLACE_DELAYED if delayed
                 else records.PLACE_DONE if resolved else records.PLACE_ACTIVE)
                for name, status, kwargs, meta, unless, waiting, delayed, resolved in rows]

    def _read_waiting(self, tasks: Iterable[str], place: str = records.PLACE_WAITING
                      ) -> dict[str, list[tuple[str, Any]]]:
        tasks = list(tasks)
        found: dict[str, list[tuple[str, Any]]] = {task: [] for task in tasks}
        flag = {"waiting": True} if place == records.PLACE_WAITING else {"delayed": True}
        for name, raw, _place in self._rows(task_name__in=tasks, **flag):
            found[name.rsplit("#", 1)[0]].append((name, raw))
        return found

    def _read_instances(self, names: Iterable[str]) -> dict[str, tuple[Any, str]]:
        return {name: (raw, place) for name, raw, place in self._rows(name__in=list(names))}

    def _read_idempotency(self, keys: Iterable[str]) -> dict[str, list[str]]:
        from triggers.models import TriggerIdempotencyKey

        with self._reading():
            return dict(TriggerIdempotencyKey.objects.using(self.using)
                        .filter(session_id=self.uid, key__in=list(keys))
                        .values_list("key", "result"))

    def _read_open(self, everything: bool) -> list[tuple[str, Any, str]]:
        return self._rows() if everything else self._rows(resolved=False)

    def _write(self, step: SessionStep, session: SessionRecord,
               events: list[dict[str, Any]]) -> None:
        session_model, instance_model, event_model = self._models()
        update: dict[str, Any] = {"state": session.to_json(), "modified": timezone.now()}
        if step.new_config is not None:
            update["config"] = step.new_config.raw
        session_model.objects.using(self.using).filter(uid=self.uid).update(**update)
        if step.dirty:
            rows = [
                instance_model(
                    session_id=self.uid, name=instance.name, task_name=instance.task_name,
                    number=instance.number, status=instance.status.value,
                    waiting=place == records.PLACE_WAITING,
                    delayed=place == records.PLACE_DELAYED, resolved=instance.is_resolved,
                    kwargs=instance.kwargs, metadata=instance.metadata,
                    unless=sorted(instance.abandon_state), due=due_at(instance),
                )
                for instance, _before, place in step.moves()
            ]
            instance_model.objects.using(self.using).bulk_create(
                rows, update_conflicts=True, unique_fields=["session", "name"],
                update_fields=["status", "waiting", "delayed", "resolved", "kwargs", "metadata",
                               "unless", "due", "modified"],
            )
        if step.new_idempotency:
            from triggers.models import TriggerIdempotencyKey

            keys = TriggerIdempotencyKey.objects.using(self.using)
            keys.bulk_create([TriggerIdempotencyKey(session_id=self.uid, key=key, result=names)
                              for key, names in step.new_idempotency.items()])
            old = list(keys.filter(session_id=self.uid).order_by("-id")
                       .values_list("id", flat=True)[idempotency_limit():idempotency_limit() + 1])
            if old:
                keys.filter(session_id=self.uid, id__lte=old[0]).delete()
        limit = history_limit()
        if events and limit:
            first = session.history_seq - len(events) + 1
            event_model.objects.using(self.using).bulk_create([
                event_model(session_id=self.uid, seq=first + n, data=event)
                for n, event in enumerate(events)])
            if first // _TRIM_EVERY != session.history_seq // _TRIM_EVERY:
                event_model.objects.using(self.using).filter(
                    session_id=self.uid, seq__lte=session.history_seq - limit).delete()

    def read_history(self, limit: int | None) -> list[dict[str, Any]]:
        bound = history_limit()
        with self._reading():
            rows = (self._models()[2].objects.using(self.using).filter(session_id=self.uid)
                    .order_by("-seq").values_list("data", flat=True))
            found = list(rows[:min(limit or bound, bound) if bound else 0])
        return found[::-1]

    # -- housekeeping ---------------------------------------------------------

    @classmethod
    def session_uids(cls, using: str = "default", **_options: Any) -> list[str]:
        """UIDs of every session stored in the database ``using``."""
        session_model = cls._models()[0]
        return list(session_model.objects.using(using).order_by("uid")
                    .values_list("uid", flat=True))

    @classmethod
    def due_sessions(cls, until: float, limit: int, using: str = "default",
                     **_options: Any) -> list[str]:
        """Sessions with an instance due by ``until``, soonest first (the partial index on
        ``due`` holds only instances with time-driven work; each step writes the due time
        of the instances it writes). Their due instances are claimed: moved
        ``CLAIM_SECONDS`` ahead, so that another sweep does not take them meanwhile and a
        session that cannot be swept waits that long instead of coming first every pass;
        the sweep's step writes their new due times."""
        instance_model = cls._models()[1]
        uids: list[str] = []
        rows = (instance_model.objects.using(using).filter(due__lte=until).order_by("due")
                .values_list("session_id", flat=True))
        offset = 0
        while len(uids) < limit:
            batch = list(rows[offset:offset + limit])
            for uid in batch:
                if uid not in uids:
                    uids.append(uid)
            if len(batch) < limit:
                break
            offset += limit
        uids = uids[:limit]
        if uids:
            instance_model.objects.using(using).filter(
                session_id__in=uids, due__lte=until).update(due=until + CLAIM_SECONDS)
        return uids

    def delete(self) -> None:
        """Remove everything this session stored."""
        session_model = self._models()[0]
        session_model.objects.using(self.using).filter(uid=self.uid).delete()
        DatabaseLock._model().objects.using(self.using).filter(name=f"hooks:{self.uid}").delete()


class DatabaseLock(BaseLock):
    """An expiring lock held as a row of ``triggers_triggerlock`` (no Redis needed).

    Taken by inserting the row, or by taking over a row whose ``expires`` has
    passed, each in a short transaction of its own; renewed by a thread of the
    holder every third of ``expire``; released by deleting the row it owns.
    """

    def __init__(self, using: str, name: str, session_uid: str,
                 expire: int = DEFAULT_LOCK_EXPIRE, timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        super().__init__(name, session_uid, expire, timeout)
        self.using = using
        self._token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @staticmethod
    def _model() -> Any:
        from triggers.models import TriggerLock

        return TriggerLock

    def _try(self) -> bool:
        from django.db import DatabaseError

        rows = self._model().objects.using(self.using)
        stamp = time.time()
        try:
            with transaction.atomic(using=self.using):
                if rows.filter(name=self.name, expires__lt=stamp).update(
                        owner=self._token, expires=stamp + self.expire):
                    return True
                with transaction.atomic(using=self.using):
                    rows.create(name=self.name, owner=self._token, expires=stamp + self.expire)
                return True
        except IntegrityError:
            return False
        except DatabaseError as exc:
            if _is_lock_timeout(exc):
                return False  # SQLite's write lock was busy: try again
            raise LockError(f"Could not take the lock {self.name!r} of session "
                            f"{self.session_uid!r}: {type(exc).__name__}: {exc}",
                            session_uid=self.session_uid) from exc

    def _acquire(self) -> bool:
        deadline = time.monotonic() + self.timeout
        delay = 0.002
        while not self._try():
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.05)
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, daemon=True,
                                         name=f"triggers-lock-renewer:{self.name}")
        self._renewer.start()
        return True

    def _renew(self) -> None:
        from django.db import DatabaseError, connections

        try:
            while not self._stop.wait(self.expire / 3):
                try:
                    renewed = self._model().objects.using(self.using).filter(
                        name=self.name, owner=self._token).update(
                            expires=time.time() + self.expire)
                except DatabaseError:
                    # A busy SQLite file, a dropped connection: try again at the next beat
                    # (on a new connection), while the lock has not expired.
                    logger.warning("Could not renew the lock %r of session %r; trying again",
                                   self.name, self.session_uid, exc_info=True)
                    connections[self.using].close()
                    continue
                if not renewed:
                    logger.error("The lock %r of session %r expired while held (taken by "
                                 "another holder meanwhile?)", self.name, self.session_uid)
                    return
        finally:
            connections[self.using].close()

    def _release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        self._model().objects.using(self.using).filter(
            name=self.name, owner=self._token).delete()


def _is_lock_timeout(exc: Exception) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "lock timeout" in text or (
        getattr(getattr(exc, "__cause__", None), "sqlstate", None) == "55P03")
