"""Session state in this process's memory (registry key ``memory``).

For flows and tests that live in one process: nothing is shared with other
processes and nothing survives the process. Values are kept as JSON text, so
they go through the same encoding as the other backends. Built on the
documented whole-session extension point (``_load_from_backend`` / ``_save``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, ClassVar

from triggers import _json as stored_json
from triggers.storages.base import BaseTriggerStorage, dumps

__all__ = ["MemoryStorageBackend"]


class MemoryStorageBackend(BaseTriggerStorage):
    """Keeps sessions in a dict of this process (``namespace`` separates stores)."""

    name = "memory"

    _stores: ClassVar[dict[str, dict[str, str]]] = {}
    _guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, uid: str, namespace: str = "default", **options: Any) -> None:
        super().__init__(uid, **options)
        self.namespace = namespace
        with self._guard:
            self._store = self._stores.setdefault(namespace, {})

    def get_options(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "lock_timeout": self.lock_timeout}

    def _load_from_backend(self) -> tuple[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]]:
        raw = self._store.get(self.uid)
        if raw is None:
            return {}, {}, {}
        data = stored_json.loads(raw)
        return data["tasks"], data["instances"], data["metadata"]

    def _save(self) -> None:
        self._store[self.uid] = dumps(self.serialize())

    @classmethod
    def session_uids(cls, namespace: str = "default") -> list[str]:
        return sorted(cls._stores.get(namespace, {}))

    def delete(self) -> None:
        self._store.pop(self.uid, None)
