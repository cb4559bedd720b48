"""Storage backends and their registry (entry-point group ``triggers.storages``)."""

from __future__ import annotations

from triggers.registry import TriggersRegistry
from triggers.storages.base import BaseTriggerStorage

__all__ = ["BaseTriggerStorage", "storage_backends"]

#: Registry of storage backends: ``storage_backends.get('cache', uid)``.
storage_backends = TriggersRegistry("triggers.storages", "storage backend")
