"""Entry-point registries for the extension points (managers, storages, runners)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from class_registry.entry_points import EntryPointClassRegistry

from triggers.exceptions import UnknownRegistryKey

__all__ = ["TriggersRegistry"]


class TriggersRegistry(EntryPointClassRegistry):  # type: ignore[misc]
    """A ClassRegistry over one setuptools entry-point group.

    ``registry.get(key, *args)`` instantiates the class registered under
    ``key``; an unknown key raises :class:`~triggers.exceptions.UnknownRegistryKey`
    listing the keys that are available. Classes are loaded lazily, on first
    use, so that importing triggers never imports third-party plug-ins.
    """

    def __init__(self, group: str, kind: str) -> None:
        # No attr_name: branding would load every entry point at import time.
        super().__init__(group)
        self.kind = kind

    def __missing__(self, key: Hashable) -> Any:
        available = ", ".join(sorted(str(k) for k in self.keys())) or "(none)"
        raise UnknownRegistryKey(
            f"Unknown {self.kind} {key!r}; available: {available}. "
            f"Register it under the {self.group!r} entry-point group.",
            key=key,
            group=self.group,
        )

    def get(self, key: Hashable, *args: Any, **kwargs: Any) -> Any:
        return self.get_class(key)(*args, **kwargs)

    def key_for(self, cls: type) -> str | None:
        """The key under which exactly ``cls`` is registered, or ``None``."""
        for key in self.keys():
            if self.get_class(key) is cls:
                return str(key)
        return None
