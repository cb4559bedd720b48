"""Storage backends and their registry (entry-point group ``triggers.storages``)."""

from __future__ import annotations

from triggers.storages.base import BaseTriggerStorage, storage_backends

__all__ = ["BaseTriggerStorage", "storage_backends"]
