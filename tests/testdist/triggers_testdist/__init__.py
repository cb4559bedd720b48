"""Plug-ins registered through real entry points, as a user's project would."""

import json
import threading
import time

from triggers import TriggerManager
from triggers.storages.base import BaseTriggerStorage


class FinalizingTriggerManager(TriggerManager):
    """The cookbook's manager, as written there."""

    TRIGGER_SESSION_FINALIZED = "sessionFinalized"

    def _post_fire(self, trigger_name, tasks_scheduled):
        # Prevent infinite recursion.
        if trigger_name == self.TRIGGER_SESSION_FINALIZED:
            return

        # A session can only be finalized once.
        if self.TRIGGER_SESSION_FINALIZED in self.storage.latest_kwargs:
            return

        # Check for any unresolved tasks...
        for config in self.get_unresolved_tasks():
            # ... ignoring any that are waiting for session finalized.
            if self.TRIGGER_SESSION_FINALIZED not in config.after:
                return

        # If we get here, we are ready to finalize the session.
        self.fire(self.TRIGGER_SESSION_FINALIZED)


class SlowFinalizingTriggerManager(FinalizingTriggerManager):
    """The cookbook's manager with a slow hook: a race between hooks would show."""

    def _post_fire(self, trigger_name, tasks_scheduled):
        time.sleep(0.05)
        super()._post_fire(trigger_name, tasks_scheduled)


class RecordingTriggerManager(TriggerManager):
    """Records every hook call (with its arguments) in a class-level list."""

    calls = []
    calls_lock = threading.Lock()

    def _post_fire(self, trigger_name, tasks_scheduled):
        with self.calls_lock:
            self.calls.append(("fire", self.storage.uid, trigger_name,
                               sorted(i.name for i in tasks_scheduled)))

    def _post_replay(self, task_instance):
        with self.calls_lock:
            self.calls.append(("replay", self.storage.uid, task_instance.name,
                               task_instance.metadata["parent"]))

    def _post_skip(self, task_instance, cascade):
        with self.calls_lock:
            self.calls.append(("skip", self.storage.uid, task_instance.name, cascade))


class DictStorage(BaseTriggerStorage):
    """A custom backend written against the documented whole-session extension point."""

    name = "dict"
    store = {}

    def _load_from_backend(self):
        raw = self.store.get(self.uid)
        if raw is None:
            return {}, {}, {}
        data = json.loads(raw)
        return data["tasks"], data["instances"], data["metadata"]

    def _save(self):
        self.store[self.uid] = json.dumps(self.serialize())
