"""Temporarily patched attributes: the original's ``AttrPatcher``.

::

    with AttrPatcher(runners, DEFAULT_TASK_RUNNER=runners.ThreadingTaskRunner):
        ...

(:func:`unittest.mock.patch.object` does the same for new code.)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Any

__all__ = ["AttrPatcher", "BasePatcher"]


class BasePatcher(ABC):
    """Sets values on a target for the duration of a ``with`` block, then restores them."""

    class DoesNotExist:
        """Marks a value that did not exist before (it is deleted again on restore)."""

    def __init__(self, target: Any, **kwargs: Any) -> None:
        self._target = target
        self._new_values = kwargs
        self._prev_values: dict[str, Any] = {}

    def __enter__(self) -> None:
        self.apply()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.restore()

    def apply(self) -> None:
        """Back up the current values and set the new ones."""
        self._prev_values = {key: self._get_value(key, self.DoesNotExist)
                             for key in self._new_values}
        self._put(self._new_values)

    def restore(self) -> None:
        """Put back what :meth:`apply` replaced."""
        self._put(self._prev_values)

    def _put(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if value is self.DoesNotExist:
                self._del_value(key)
            else:
                self._set_value(key, value)

    @abstractmethod
    def _get_value(self, key: str, default: Any = None) -> Any: ...

    @abstractmethod
    def _set_value(self, key: str, value: Any) -> None: ...

    @abstractmethod
    def _del_value(self, key: str) -> None: ...


class AttrPatcher(BasePatcher):
    """Patches attributes of an object (a module, a class …)."""

    def _get_value(self, key: str, default: Any = None) -> Any:
        return getattr(self._target, key, default)

    def _set_value(self, key: str, value: Any) -> None:
        setattr(self._target, key, value)

    def _del_value(self, key: str) -> None:
        delattr(self._target, key)
