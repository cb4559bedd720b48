"""triggers: a distributed observer pattern for Django and Celery.

Fire named triggers inside a session; once every trigger a task waits for has
fired (in any order, on any server, days apart) the task runs as a Celery task,
and a finished task fires its own name so that workflows chain.

Names are imported lazily, so importing ``triggers`` touches neither Django
settings nor Celery.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__all__ = [
    "CacheStorageBackend",
    "DatabaseStorageBackend",
    "RedisStorageBackend",
    "TaskConfig",
    "TaskContext",
    "TaskInstance",
    "TaskStatus",
    "TriggerManager",
    "TriggerTask",
    "TriggersError",
    "get_trigger_manager",
    "with_context",
]

__version__ = "2.0.0.dev0"

_LOCATIONS = {
    "CacheStorageBackend": "triggers.storages.cache",
    "TaskConfig": "triggers.types",
    "TaskContext": "triggers.task",
    "TaskInstance": "triggers.types",
    "TaskStatus": "triggers.types",
    "TriggerManager": "triggers.manager",
    "TriggerTask": "triggers.task",
    "TriggersError": "triggers.exceptions",
    "DatabaseStorageBackend": "triggers.storages.database",
    "RedisStorageBackend": "triggers.storages.redis",
    "get_trigger_manager": "triggers.manager",
    "with_context": "triggers.exceptions",
}

if TYPE_CHECKING:
    from triggers.exceptions import TriggersError, with_context
    from triggers.manager import TriggerManager, get_trigger_manager
    from triggers.storages.cache import CacheStorageBackend
    from triggers.storages.database import DatabaseStorageBackend
    from triggers.storages.redis import RedisStorageBackend
    from triggers.task import TaskContext, TriggerTask
    from triggers.types import TaskConfig, TaskInstance, TaskStatus


def __getattr__(name: str) -> Any:
    try:
        module = _LOCATIONS[name]
    except KeyError:
        raise AttributeError(f"module 'triggers' has no attribute {name!r}") from None
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
