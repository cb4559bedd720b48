"""Validation of trigger configurations: every problem reported at once."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Set
from typing import Any

from triggers import _json as stored_json
from triggers.exceptions import ConfigurationError, ConfigurationProblem, InvalidArgument
from triggers.types import (
    CONDITION_ALL,
    CONDITION_ANY,
    DIRECTIVE_AFTER,
    DIRECTIVE_AND_EVERY,
    DIRECTIVE_DELAY,
    DIRECTIVE_ON_RECOVERY,
    DIRECTIVE_RUN,
    DIRECTIVE_UNLESS,
    DIRECTIVE_USING,
    DIRECTIVE_WITH_PARAMS,
    DIRECTIVES,
    INSTANCE_SEPARATOR,
    OUTCOME_DIRECTIVES,
    TaskConfig,
    TaskStatus,
)

__all__ = [
    "RESERVED_METADATA",
    "check_kwargs",
    "check_kwargs_map",
    "check_metadata",
    "check_status",
    "json_copy",
    "near_miss_directive",
    "validate_configuration",
    "validate_trigger_name",
]


#: What a recovery run does with a task's failed instance (directive ``onRecovery``).
RECOVERY_POLICIES = ("rerun", "skip")


def _edit_distance(a: str, b: str) -> int:
    """Edits (insert, delete, replace, swap two neighbours) that turn ``a`` into ``b``."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i] + [0] * len(b)
        for j, char_b in enumerate(b, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1,
                             previous[j - 1] + (char_a != char_b))
            if i > 1 and j > 1 and char_a == b[j - 2] and a[i - 2] == char_b:
                current[j] = min(current[j], previous2[j - 2] + 1)
        previous2, previous = previous, current
    return previous[-1]


def near_miss_directive(key: Any) -> str | None:
    """The built-in directive that ``key`` probably misspells, or ``None``.

    A key is a near miss when it differs from a directive only in case
    (``Run``, ``andevery``), or by one or two edits — a letter inserted,
    deleted, replaced, or two neighbours swapped (``unles``, ``afterr``,
    ``withParam``); one edit only for the three-letter ``run``. The directives
    themselves are not near misses.
    """
    if not isinstance(key, str) or key in DIRECTIVES:
        return None
    folded = key.casefold()
    best: tuple[int, str] | None = None
    for directive in DIRECTIVES:
        distance = _edit_distance(folded, directive.casefold())
        if distance <= (1 if len(directive) <= 4 else 2) and (best is None or distance < best[0]):
            best = (distance, directive)
    return best[1] if best is not None else None


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _with_lists(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The entry with ``after`` / ``unless`` sets as lists (they may be given as sets)."""
    data = dict(entry)
    for directive in (DIRECTIVE_AFTER, DIRECTIVE_UNLESS):
        if isinstance(data.get(directive), (set, frozenset)):
            data[directive] = sorted(data[directive], key=str)
    return data


def validate_trigger_name(name: Any) -> str | None:
    """Return what is wrong with a trigger name, or ``None`` if it is fine."""
    if not isinstance(name, str):
        return f"a trigger name must be a string, got {_describe(name)}"
    if not name.strip():
        return "a trigger name must not be empty"
    return None


def _trigger_list(value: Any, allow_empty: bool, conditions: bool = False) -> str | None:
    """What is wrong with a list of triggers (or of condition items), or ``None``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, Set)):
        return f"expected a list of trigger names, got {_describe(value)}"
    if not value and not allow_empty:
        return "expected at least one trigger name, got an empty list"
    for item in value:
        problem = _condition_item(item, 0) if conditions else validate_trigger_name(item)
        if problem:
            return f"{problem} (in {_describe(value)})"
    return None


def _condition_item(item: Any, depth: int) -> str | None:
    if not isinstance(item, Mapping):
        return validate_trigger_name(item)
    if depth >= 8:
        return "conditions may nest at most 8 levels deep"
    if len(item) != 1 or next(iter(item)) not in (CONDITION_ANY, CONDITION_ALL):
        return (f"a nested condition must be {{'any': [...]}} or {{'all': [...]}}, "
                f"got {_describe(item)}")
    nested = next(iter(item.values()))
    if isinstance(nested, (str, bytes)) or not isinstance(nested, (list, tuple)) or not nested:
        return f"{next(iter(item))!r} takes a non-empty list, got {_describe(nested)}"
    for sub in nested:
        problem = _condition_item(sub, depth + 1)
        if problem:
            return problem
    return None


def json_copy(value: Any, what: str, error: type[Exception] = InvalidArgument) -> Any:
    """A JSON round trip: checks that a value can be stored, and normalises it as stored."""
    try:
        return stored_json.round_trip(value)
    except (TypeError, ValueError) as exc:
        raise error(
            f"{what} must be JSON-serialisable (datetime, date, time, Decimal and UUID are "
            f"kept as such): {exc}") from exc


def check_kwargs(value: Any, what: str, error: type[Exception] = InvalidArgument
                 ) -> dict[str, Any]:
    """Kwargs (``None`` or a mapping with string keys, JSON-serialisable), as stored."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise error(f"{what} must be a mapping (or None), got {_describe(value)}")
    bad = [key for key in value if not isinstance(key, str)]
    if bad:
        raise error(f"{what} must have string keys, got {bad!r}")
    copied: dict[str, Any] = json_copy(dict(value), what, error)
    return copied


#: Metadata keys the engine computes and relies on; public calls may not set them.
RESERVED_METADATA = frozenset({
    "attempts", "cooldown", "created", "delay", "depth", "log_level", "modified", "recoveries",
    "lease", "run", "runner", "scheduled", "start_after", "started", "task_id",
})


def check_metadata(value: Any, what: str = "metadata") -> dict[str, Any]:
    """User metadata: like kwargs, and without the keys the engine relies on."""
    metadata = check_kwargs(value, what)
    reserved = sorted(RESERVED_METADATA & set(metadata))
    if reserved:
        raise InvalidArgument(
            f"{what} may not set {', '.join(reserved)}: triggers maintains these keys itself")
    return metadata


def check_kwargs_map(value: Any, what: str) -> dict[str, dict[str, Any]]:
    """Trigger name → kwargs (an instance's ``kwargs``), checked and normalised."""
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{what} must map trigger names to kwargs, got {_describe(value)}")
    checked = {}
    for trigger, kwargs in value.items():
        problem = validate_trigger_name(trigger)
        if problem:
            raise InvalidArgument(f"{what}: {problem}")
        if not isinstance(kwargs, Mapping):
            raise InvalidArgument(
                f"{what}[{trigger!r}] must be a mapping of kwargs, got {_describe(kwargs)}"
            )
        checked[trigger] = check_kwargs(kwargs, f"{what}[{trigger!r}]")
    return checked


def check_status(value: Any) -> TaskStatus:
    try:
        return TaskStatus(value)
    except ValueError:
        raise InvalidArgument(
            f"Unknown status {value!r}; statuses: {', '.join(s.value for s in TaskStatus)}"
        ) from None


def validate_configuration(
    configuration: Any,
    runner_names: Callable[[], Set[str]] | None,
    check_task: Callable[[str], str | None] | None = None,
    session_uid: str | None = None,
    stored: bool = False,
    custom_directives: Collection[str] | None = None,
) -> dict[str, TaskConfig]:
    """Validate a whole configuration and return its :class:`TaskConfig` objects.

    Raises :class:`ConfigurationError` listing every problem (task, directive,
    what is wrong) if anything is invalid. ``runner_names`` returns the known
    runner keys (for ``using``; ``None`` skips that check); ``check_task``
    returns what is wrong with a ``run`` target, or ``None``.

    A key that is not a built-in directive but a near miss of one
    (:func:`near_miss_directive`: ``unles``, ``Run`` …) is refused with a
    "did you mean" problem. Other keys go to :attr:`TaskConfig.extras` for
    custom managers — all of them when ``custom_directives`` is ``None``, else
    only those it names (a manager's ``custom_directives``); the keys it names
    are accepted even when they are near misses.

    ``stored`` is for configurations read back from a store: it skips the
    checks that stored (already JSON) data cannot fail, and the checks of
    unknown keys, so that what an earlier release accepted keeps loading.
    """
    problems: list[ConfigurationProblem] = []

    def problem(task: str | None, directive: str | None, message: str) -> None:
        problems.append(ConfigurationProblem(task, directive, message))

    if not isinstance(configuration, Mapping):
        problem(None, None, f"a configuration must be a mapping of task names, got "
                            f"{_describe(configuration)}")
        raise ConfigurationError(problems, session_uid)

    configs: dict[str, TaskConfig] = {}
    for task_name, entry in configuration.items():
        if not isinstance(task_name, str) or not task_name.strip():
            problem(None, None, f"a task name must be a non-empty string, got {_describe(task_name)}")
            continue
        if INSTANCE_SEPARATOR in task_name:
            problem(task_name, None, f"a task name must not contain {INSTANCE_SEPARATOR!r} "
                                     f"(it separates task names from instance numbers)")
        if not isinstance(entry, Mapping):
            problem(task_name, None, f"expected a mapping of directives, got {_describe(entry)}")
            continue
        before = len(problems)
        misspelt: set[str] = set()
        if not stored:
            for key in entry:
                if key in DIRECTIVES or (custom_directives is not None
                                         and key in custom_directives):
                    continue
                meant = near_miss_directive(key)
                if meant is not None:
                    misspelt.add(meant)
                    problem(task_name, key if isinstance(key, str) else None,
                            f"unknown directive {key!r}; did you mean {meant!r}?")
                elif custom_directives is not None:
                    own = ", ".join(repr(name) for name in sorted(custom_directives))
                    problem(task_name, key if isinstance(key, str) else None,
                            f"unknown directive {key!r}; besides the built-in directives, "
                            + (f"this manager accepts only {own}" if own else
                               "this manager accepts none"))

        and_every = entry.get(DIRECTIVE_AND_EVERY)
        if DIRECTIVE_AND_EVERY in entry and and_every is not None:
            trouble = validate_trigger_name(and_every)
            if trouble:
                problem(task_name, DIRECTIVE_AND_EVERY, f"expected ONE trigger name; {trouble}")

        if DIRECTIVE_AFTER not in entry:
            if DIRECTIVE_AFTER not in misspelt:
                problem(task_name, DIRECTIVE_AFTER, "required directive is missing")
        else:
            trouble = _trigger_list(entry[DIRECTIVE_AFTER], allow_empty=bool(and_every),
                                    conditions=True)
            if trouble:
                problem(task_name, DIRECTIVE_AFTER, trouble)

        if DIRECTIVE_RUN not in entry:
            if DIRECTIVE_RUN not in misspelt:
                problem(task_name, DIRECTIVE_RUN, "required directive is missing")
        else:
            run = entry[DIRECTIVE_RUN]
            if not isinstance(run, str) or not run.strip():
                problem(task_name, DIRECTIVE_RUN,
                        f"expected the name of a Celery task, got {_describe(run)}")
            elif check_task is not None:
                trouble = check_task(run)
                if trouble:
                    problem(task_name, DIRECTIVE_RUN, trouble)

        if entry.get(DIRECTIVE_UNLESS) is not None:
            trouble = _trigger_list(entry[DIRECTIVE_UNLESS], allow_empty=True, conditions=True)
            if trouble:
                problem(task_name, DIRECTIVE_UNLESS, trouble)

        params = entry.get(DIRECTIVE_WITH_PARAMS)
        if params is not None:
            if not isinstance(params, Mapping):
                problem(task_name, DIRECTIVE_WITH_PARAMS,
                        f"expected a mapping of trigger name to kwargs, got {_describe(params)}")
            else:
                for key, value in params.items():
                    if not isinstance(key, str) or not key:
                        problem(task_name, DIRECTIVE_WITH_PARAMS,
                                f"keys must be trigger names, got {_describe(key)}")
                    elif not isinstance(value, Mapping):
                        problem(task_name, DIRECTIVE_WITH_PARAMS,
                                f"value for {key!r} must be a mapping of kwargs, "
                                f"got {_describe(value)}")
                    elif not all(isinstance(k, str) for k in value):
                        problem(task_name, DIRECTIVE_WITH_PARAMS,
                                f"kwarg names for {key!r} must be strings")

        delay = entry.get(DIRECTIVE_DELAY)
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, (int, float))
                                  or delay < 0 or delay != delay):
            problem(task_name, DIRECTIVE_DELAY,
                    f"expected a number of seconds >= 0, got {_describe(delay)}")

        for directive in OUTCOME_DIRECTIVES:
            if entry.get(directive) is not None:
                trouble = _trigger_list(entry[directive], allow_empty=True)
                if trouble:
                    problem(task_name, directive, trouble)

        policy = entry.get(DIRECTIVE_ON_RECOVERY)
        if policy is not None and policy not in RECOVERY_POLICIES:
            problem(task_name, DIRECTIVE_ON_RECOVERY,
                    f"expected one of {', '.join(RECOVERY_POLICIES)}, got {_describe(policy)}")

        using = entry.get(DIRECTIVE_USING)
        if using is not None and runner_names is not None:
            known = runner_names()
            if not isinstance(using, str) or using not in known:
                problem(task_name, DIRECTIVE_USING,
                        f"unknown runner {using!r}; available: {', '.join(sorted(known))}")

        if not stored:
            try:
                stored_json.dumps(_with_lists(entry))
            except (TypeError, ValueError) as exc:
                problem(task_name, None, f"the entry must be JSON-serialisable ({exc})")

        if len(problems) == before:
            configs[task_name] = TaskConfig.from_dict(task_name, entry)

    if problems:
        raise ConfigurationError(problems, session_uid)
    return configs
