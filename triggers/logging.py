"""Logging inside trigger tasks: context on every message, the highest level recorded.

``with context.get_logger_context({'subject': 42}) as logger:`` yields a
:class:`ContextLogger`. Each message carries the block's context (in
``record.context``), merged with per-message context given as
``extras={'context': {...}}`` (``extra=`` works too). An exception raised
inside the block is logged, with any :func:`~triggers.exceptions.with_context`
data, and re-raised. The highest level emitted is recorded on the task
instance as ``log_level`` when the task ends.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Literal

__all__ = ["ContextLogger", "LevelTracker", "LoggerContext"]


class LevelTracker:
    """Remembers the highest log level emitted through the loggers it handed out."""

    def __init__(self) -> None:
        self.level = logging.NOTSET

    def record(self, level: int) -> None:
        if level > self.level:
            self.level = level


class ContextLogger:
    """A logger that attaches context to every message and tracks the highest level."""

    def __init__(self, logger: logging.Logger, context: Mapping[str, Any],
                 tracker: LevelTracker) -> None:
        self.logger = logger
        self.context = dict(context)
        self.tracker = tracker

    def log(self, level: int, msg: Any, *args: Any, extras: Mapping[str, Any] | None = None,
            extra: Mapping[str, Any] | None = None, exc_info: Any = None,
            stack_info: bool = False) -> None:
        self.tracker.record(level)
        merged_extra: dict[str, Any] = {}
        for source in (extra, extras):
            if source:
                merged_extra.update(source)
        context = dict(self.context)
        message_context = merged_extra.pop("context", None)
        if isinstance(message_context, Mapping):
            context.update(message_context)
        merged_extra["context"] = context
        if self.logger.isEnabledFor(level):
            self.logger.log(level, msg, *args, extra=merged_extra, exc_info=exc_info,
                            stack_info=stack_info, stacklevel=3)

    def debug(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.log(logging.DEBUG, msg, *args, **kwargs)

    def info(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.log(logging.INFO, msg, *args, **kwargs)

    def warning(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.log(logging.WARNING, msg, *args, **kwargs)

    warn = warning

    def error(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.log(logging.ERROR, msg, *args, **kwargs)

    def exception(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("exc_info", True)
        self.log(logging.ERROR, msg, *args, **kwargs)

    def critical(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.log(logging.CRITICAL, msg, *args, **kwargs)

    fatal = critical


class LoggerContext:
    """Context manager returned by :meth:`TaskContext.get_logger_context`."""

    def __init__(self, logger: logging.Logger, context: Mapping[str, Any],
                 tracker: LevelTracker) -> None:
        self.logger = ContextLogger(logger, context, tracker)

    def __enter__(self) -> ContextLogger:
        return self.logger

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        if exc is not None and not _is_control_flow(exc):
            exc_context = getattr(exc, "context", None)
            self.logger.log(
                logging.ERROR,
                "%s: %s", type(exc).__name__, exc,
                extras={"context": dict(exc_context) if isinstance(exc_context, Mapping) else {}},
                exc_info=(exc_type, exc, tb),
            )
        return False


def _is_control_flow(exc: BaseException) -> bool:
    from triggers.task import RetryInstance, SkipInstance

    return isinstance(exc, (RetryInstance, SkipInstance))
