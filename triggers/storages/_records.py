"""How the storages encode a session's records (private to the storage backends).

A session is stored as records, split by how they are used:

* the configuration, parsed once per process and cached by its version (a hash
  of its content, so sessions with the same configuration share it);
* per-session fields: the configuration version, one counter per task, the
  latest kwargs of each trigger, session metadata;
* the instances, each its own record, kept in one of three *places*:
  ``w`` — waiting (unstarted, or scheduled with a delay), indexed per task,
  the only ones a fired trigger reads; ``l`` — delayed (scheduled with a delay,
  indexed per task, read only by the task's ``unless`` triggers); ``a`` — active
  (scheduled, running, failed); ``d`` — done (finished, abandoned, replayed,
  skipped);
* the history of the session (bounded, append-only).
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from triggers import _json as stored_json
from triggers.config import validate_configuration
from triggers.exceptions import ConfigurationError, CorruptSessionState
from triggers.types import (
    STATUS_SCHEDULED,
    STATUS_UNSTARTED,
    TaskConfig,
    TaskInstance,
    TaskStatus,
    task_name_of,
)

__all__ = [
    "PLACE_ACTIVE",
    "PLACE_DELAYED",
    "PLACE_DONE",
    "PLACE_WAITING",
    "TASK_PLACES",
    "ParsedConfig",
    "corrupt",
    "decode",
    "digest",
    "dumps",
    "instance_from_json",
    "instance_to_json",
    "parse_config",
    "place_of",
    "process_name",
]

dumps = stored_json.dumps

PLACE_WAITING = "w"
PLACE_DELAYED = "l"
PLACE_ACTIVE = "a"
PLACE_DONE = "d"
#: Places kept per task.
TASK_PLACES = (PLACE_WAITING, PLACE_DELAYED)

#: Format of the stored layout (1: one JSON value per session; 2: records).
FORMAT_VERSION = 2


def place_of(instance: TaskInstance) -> str:
    """Where an instance's record is kept, from its status."""
    status = instance.status
    if status == STATUS_UNSTARTED:
        return PLACE_WAITING
    if status == STATUS_SCHEDULED and instance.metadata.get("start_after") is not None:
        return PLACE_DELAYED
    return PLACE_DONE if instance.is_resolved else PLACE_ACTIVE


def corrupt(uid: str, where: str, reason: str) -> CorruptSessionState:
    return CorruptSessionState(
        f"Stored state of session {uid!r} ({where}) is corrupt: {reason}. Nothing was "
        "executed; inspect or delete the stored value.", session_uid=uid)


def decode(raw: Any, uid: str, where: str) -> Any:
    """A stored JSON value (text or bytes); CorruptSessionState if it is not one."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise corrupt(uid, where, "not UTF-8 JSON text (written by another program?)") from exc
    if not isinstance(raw, str):
        raise corrupt(uid, where, f"is a {type(raw).__name__}, not JSON text")
    try:
        return stored_json.loads(raw)
    except ValueError as exc:
        raise corrupt(uid, where, f"not valid JSON ({exc})") from exc


def digest(raw: Any) -> str:
    """What a compare-and-set compares: the SHA-1 of a stored value ('' if absent)."""
    if raw is None:
        return ""
    if isinstance(raw, str):
        raw = raw.encode("utf-8")
    return hashlib.sha1(raw).hexdigest()  # noqa: S324 - a change detector, not security


def instance_to_json(instance: TaskInstance) -> str:
    data = instance.to_dict()
    meta = data.get("meta")
    if instance.is_resolved and meta and "finished" in meta \
            and meta.get("modified") == meta["finished"]:
        # Compact done records: "modified" is "finished" (restored when read).
        data["meta"] = {key: value for key, value in meta.items() if key != "modified"}
    return dumps(data)


def instance_from_json(name: str, data: Any, tasks: Mapping[str, TaskConfig], uid: str,
                       where: str) -> TaskInstance:
    try:
        config = tasks[data.get("task") or task_name_of(name)]
        meta = data.get("meta") or {}
        if "modified" not in meta and "finished" in meta:
            meta = {**meta, "modified": meta["finished"]}
        return TaskInstance(
            name=name,
            config=config,
            kwargs=data.get("kwargs") or {},
            status=TaskStatus(data["status"]),
            metadata=meta,
            abandon_state=data.get("unless") or (),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptSessionState(
            f"Stored state of session {uid!r} ({where}) is corrupt: instance {name!r} "
            f"cannot be read ({type(exc).__name__}: {exc}). Nothing was executed.",
            session_uid=uid,
        ) from exc


class ParsedConfig:
    """A validated configuration with its trigger index, shared by every session that has it."""

    __slots__ = ("index", "raw", "tasks", "version")

    def __init__(self, tasks: dict[str, TaskConfig], version: str | None = None) -> None:
        self.tasks = tasks
        self.raw = {name: config.to_dict() for name, config in tasks.items()}
        self.version = version or config_version(self.raw)
        #: Trigger → (names of the tasks that react to it, triggers whose latest kwargs
        #: those tasks need, the tasks whose ``unless`` mentions it).
        index: dict[str, tuple[list[str], list[str], list[str]]] = {}
        for config in tasks.values():
            for trigger in config.triggers:
                names, needed, unless = index.setdefault(trigger, ([], [], []))
                names.append(config.name)
                if trigger in config.unless_names:
                    unless.append(config.name)
                for other in sorted(config.after_names | config.unless_names):
                    if other not in needed:
                        needed.append(other)
        self.index = index

    def reacting(self, trigger: str) -> list[TaskConfig]:
        entry = self.index.get(trigger)
        return [self.tasks[name] for name in entry[0]] if entry else []


def config_version(raw: Mapping[str, Any]) -> str:
    """The version of a configuration: a hash of its content."""
    text = stored_json.dumps({name: raw[name] for name in sorted(raw)})
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]  # noqa: S324 - an identifier


_parsed: dict[str, ParsedConfig] = {}


def parse_config(raw: Any, uid: str, where: str, version: str | None = None) -> ParsedConfig:
    """The stored configuration ``raw`` validated and indexed (cached by ``version``)."""
    cached = _parsed.get(version) if version is not None else None
    if cached is not None:
        return cached
    if raw is None:
        raise corrupt(uid, where, f"configuration version {version} is missing")
    if not isinstance(raw, Mapping):
        raise corrupt(uid, where, f"the configuration is a {type(raw).__name__}, not an object")
    try:
        tasks = validate_configuration(raw, None, session_uid=uid, stored=True)
    except ConfigurationError as exc:
        raise corrupt(uid, where, f"the stored configuration is invalid: {exc}") from exc
    parsed = ParsedConfig(tasks, version)
    remember_config(parsed)
    return parsed


def remember_config(parsed: ParsedConfig) -> ParsedConfig:
    if len(_parsed) >= 512:
        _parsed.clear()
    _parsed[parsed.version] = parsed
    return parsed


def cached_config(version: str | None) -> ParsedConfig | None:
    return _parsed.get(version) if version else None


EMPTY_CONFIG = remember_config(ParsedConfig({}))


_process: tuple[int, str] = (0, "")


def process_name() -> str:
    """``host:pid`` of this process, as the history records who did what."""
    global _process
    pid = os.getpid()
    if _process[0] != pid:
        _process = (pid, f"{socket.gethostname()}:{pid}")
    return _process[1]


def flatten(pairs: Iterable[Any]) -> dict[Any, Any]:
    """``[k1, v1, k2, v2 …]`` (a Redis reply) as a dict."""
    items = list(pairs)
    return dict(zip(items[::2], items[1::2], strict=True))
