"""The workflow graph of a session, drawn as SVG on the server (no JavaScript).

Tasks are boxes coloured by the status of their latest instance; the triggers fired
from outside (by the application) are pills on the left. An arrow leads from each
trigger or task to the tasks that wait for it: a finished task fires its own name (a
cascade), an outcome directive (``onSuccess`` …) the triggers it names. ``unless``
arrows are dashed red. An unstarted instance's box says which triggers it still waits
for. The layout is layered: every node sits one column right of the furthest node that
leads to it (cycles, which cascades allow, are cut).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from html import escape

from triggers.types import TaskConfig, TaskInstance, TaskStatus

__all__ = ["STATUS_COLOURS", "workflow_svg"]

#: Fill colour of each status (the admin's badges use them too).
STATUS_COLOURS: dict[str, str] = {
    TaskStatus.UNSTARTED.value: "#78909c",
    TaskStatus.SCHEDULED.value: "#1e88e5",
    TaskStatus.RUNNING.value: "#ef6c00",
    TaskStatus.FINISHED.value: "#2e7d32",
    TaskStatus.FAILED.value: "#c62828",
    TaskStatus.ABANDONED.value: "#616161",
    TaskStatus.REPLAYED.value: "#6a1b9a",
    TaskStatus.SKIPPED.value: "#795548",
}
#: A scheduled instance whose message could not be sent.
DISPATCH_ERROR_COLOUR = "#d84315"
NOT_CREATED_COLOUR = "#eceff1"

_WIDTH, _HEIGHT, _COLUMN, _ROW, _MARGIN = 190, 58, 240, 78, 16


@dataclass
class _Node:
    key: str
    label: str
    kind: str  # "task" or "trigger"
    lines: list[str] = field(default_factory=list)
    fill: str = NOT_CREATED_COLOUR
    text: str = "#263238"
    href: str | None = None
    tooltip: str = ""
    column: int = 0
    row: int = 0

    @property
    def x(self) -> int:
        return _MARGIN + self.column * _COLUMN

    @property
    def y(self) -> int:
        return _MARGIN + self.row * _ROW


def _latest(instances: Iterable[TaskInstance]) -> dict[str, TaskInstance]:
    latest: dict[str, TaskInstance] = {}
    for instance in instances:
        held = latest.get(instance.task_name)
        if held is None or instance.number > held.number:
            latest[instance.task_name] = instance
    return latest


def _or_names(condition: Iterable[object], inside: bool = False) -> set[str]:
    """The trigger names of a condition that sit in an OR (``{"any": [...]}``)."""
    found: set[str] = set()
    for item in condition:
        if isinstance(item, str):
            if inside:
                found.add(item)
        elif isinstance(item, Mapping):
            for key, nested in item.items():
                found |= _or_names(nested, inside or key == "any")
    return found


def _shorten(text: str, limit: int = 30) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def workflow_svg(tasks: Mapping[str, TaskConfig], instances: Iterable[TaskInstance],
                 fired: Collection[str] = (),
                 link: Callable[[TaskInstance], str] | None = None) -> str:
    """The graph of ``tasks`` with the state of ``instances``, as an ``<svg>`` element.

    ``fired`` names the triggers fired so far (their pills are filled); ``link`` gives
    the address a task's box links to (its latest instance's page).
    """
    instances = list(instances)
    latest = _latest(instances)
    counts: dict[str, int] = {}
    for instance in instances:
        counts[instance.task_name] = counts.get(instance.task_name, 0) + 1
    nodes: dict[str, _Node] = {}
    for name, config in tasks.items():
        node = nodes[f"task:{name}"] = _Node(f"task:{name}", name, "task")
        node.tooltip = f"{name}: runs {config.run}"
        found = latest.get(name)
        if found is None:
            node.lines = ["no instance yet"]
            continue
        instance = found
        status = instance.status.value
        node.fill, node.text = STATUS_COLOURS[status], "#ffffff"
        suffix = f" · {counts[name]} instances" if counts[name] > 1 else ""
        node.lines = [f"{instance.name} {status}{suffix}"]
        if instance.metadata.get("dispatch_error"):
            node.fill = DISPATCH_ERROR_COLOUR
            node.lines = [f"{instance.name} not sent{suffix}"]
        if instance.status == TaskStatus.UNSTARTED:
            node.lines.append("waits for " + ", ".join(instance.missing_triggers))
        elif instance.status == TaskStatus.FAILED:
            node.lines.append(str(instance.metadata.get("exc_type", "")))
        node.tooltip += "\n" + "\n".join(node.lines)
        if link is not None:
            node.href = link(instance)
    edges: list[tuple[str, str, str]] = []  # source, target, kind ("after", "unless", "on…")
    for name, config in tasks.items():
        either = {"after": _or_names(config.after), "unless": _or_names(config.unless)}
        for kind, wanted in (("after", config.after_names), ("unless", config.unless_names)):
            for trigger in sorted(wanted):
                # "or": one of several triggers is enough (an OR in the condition)
                label = "or" if kind == "after" and trigger in either[kind] else kind
                source = f"task:{trigger}" if trigger in tasks else f"trigger:{trigger}"
                edges.append((source, f"task:{name}", label))
        for directive, names in config.outcomes.items():
            for trigger in names:
                target = f"task:{trigger}" if trigger in tasks else f"trigger:{trigger}"
                edges.append((f"task:{name}", target, directive))
    for source, target, _kind in edges:
        for key in (source, target):
            if key not in nodes:
                trigger = key.split(":", 1)[1]
                node = nodes[key] = _Node(key, trigger, "trigger")
                node.lines = ["fired" if trigger in fired else "not fired yet"]
                node.tooltip = f"trigger {trigger}: " + node.lines[0]
                if trigger in fired:
                    node.fill = "#fff8e1"
    if not nodes:
        return ('<svg xmlns="http://www.w3.org/2000/svg" class="triggers-graph" width="320" '
                'height="40" role="img" aria-label="workflow graph" font-family="sans-serif" '
                'font-size="12"><text x="8" y="24" fill="#546e7a">No tasks are configured.'
                '</text></svg>')
    _layout(nodes, edges)
    return _draw(nodes, edges)


def _layout(nodes: dict[str, _Node], edges: list[tuple[str, str, str]]) -> None:
    outgoing: dict[str, list[str]] = {key: [] for key in nodes}
    for source, target, _kind in edges:
        if source != target and target not in outgoing[source]:
            outgoing[source].append(target)
    # Cut the edges that close a cycle (depth first, sources first): what is left is a
    # DAG, laid out by longest path, so a cycle does not push its nodes to the right.
    order: list[str] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    back: set[tuple[str, str]] = set()
    has_incoming = {target for targets in outgoing.values() for target in targets}
    for root in sorted(nodes, key=lambda k: (k in has_incoming, k)):
        if root in state:
            continue
        stack = [(root, iter(sorted(outgoing[root])))]
        state[root] = 1
        while stack:
            key, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                state[key] = 2
                order.append(key)
            elif state.get(child) == 1:
                back.add((key, child))
            elif child not in state:
                state[child] = 1
                stack.append((child, iter(sorted(outgoing[child]))))
    incoming: dict[str, list[str]] = {key: [] for key in nodes}
    for source, targets in outgoing.items():
        for target in targets:
            if (source, target) not in back:
                incoming[target].append(source)
    columns: dict[str, int] = {}
    for key in reversed(order):  # a topological order of the DAG
        columns[key] = max((columns[s] + 1 for s in incoming[key]), default=0)
    # A trigger fired from outside sits just left of the first task that waits for it.
    for key, node in nodes.items():
        if node.kind == "trigger" and not incoming[key] and outgoing[key]:
            columns[key] = max(min(columns[t] for t in outgoing[key]) - 1, 0)
    by_column: dict[int, list[str]] = {}
    for key in sorted(nodes, key=lambda k: (nodes[k].kind != "trigger", k)):
        by_column.setdefault(columns[key], []).append(key)
    # Rows: each column ordered by the mean row of what leads to it (fewer crossings).
    placed: dict[str, float] = {}
    for column in sorted(by_column):
        keys = by_column[column]
        for index, key in enumerate(keys):
            rows_before = [placed[s] for s in incoming[key] if s in placed]
            placed[key] = sum(rows_before) / len(rows_before) if rows_before else index
        keys.sort(key=lambda k: (placed[k], k))
        for row, key in enumerate(keys):
            nodes[key].column, nodes[key].row = column, row
            placed[key] = row


def _draw(nodes: dict[str, _Node], edges: list[tuple[str, str, str]]) -> str:
    width = _MARGIN * 2 + max((n.x for n in nodes.values()), default=0) + _WIDTH - _MARGIN
    height = _MARGIN * 2 + max((n.y for n in nodes.values()), default=0) + _HEIGHT - _MARGIN
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="triggers-graph" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'style="max-width:100%;height:auto;min-width:{min(width, 900)}px" '
        'aria-label="workflow graph" font-family="sans-serif" font-size="12">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#546e7a"/></marker></defs>',
    ]
    for source_key, target_key, kind in edges:
        source, target = nodes[source_key], nodes[target_key]
        x1, y1 = source.x + _WIDTH, source.y + _HEIGHT // 2
        x2, y2 = target.x, target.y + _HEIGHT // 2
        if source is target:  # a task that waits for itself (andEvery on its own name)
            x1, y1 = source.x + _WIDTH - 40, source.y
            x2, y2 = source.x + _WIDTH, source.y + 14
            path = f"M{x1},{y1} C{x1},{y1 - 28} {x2 + 28},{y2} {x2},{y2}"
        elif target.column <= source.column:  # a back edge (a cycle): around the bottom
            x1, y1 = source.x + _WIDTH // 2, source.y + _HEIGHT
            x2, y2 = target.x + _WIDTH // 2, target.y + _HEIGHT
            low = max(y1, y2) + _ROW // 2
            path = f"M{x1},{y1} C{x1},{low} {x2},{low} {x2},{y2}"
        else:
            middle = (x1 + x2) // 2
            path = f"M{x1},{y1} C{middle},{y1} {middle},{y2} {x2},{y2}"
        style = {"after": 'stroke="#546e7a"', "or": 'stroke="#546e7a"',
                 "unless": 'stroke="#c62828" stroke-dasharray="5,4"'}.get(
            kind, 'stroke="#1565c0" stroke-dasharray="2,3"')
        parts.append(f'<path class="edge edge-{escape(kind)}" d="{path}" fill="none" {style} '
                     f'stroke-width="1.5" marker-end="url(#arrow)"><title>'
                     f'{escape(source.label)} → {escape(target.label)} ({escape(kind)})'
                     '</title></path>')
        if kind != "after":
            parts.append(f'<text x="{(x1 + x2) // 2}" y="{(y1 + y2) // 2 - 4}" '
                         f'text-anchor="middle" fill="#455a64" font-size="10">'
                         f'{escape(kind)}</text>')
    for node in sorted(nodes.values(), key=lambda n: n.key):
        radius = _HEIGHT // 2 if node.kind == "trigger" else 6
        stroke = "#90a4ae" if node.kind == "trigger" else "#37474f"
        shape = (f'<rect x="{node.x}" y="{node.y}" width="{_WIDTH}" height="{_HEIGHT}" '
                 f'rx="{radius}" fill="{node.fill}" stroke="{stroke}"/>')
        label = (f'<text x="{node.x + _WIDTH // 2}" y="{node.y + 20}" text-anchor="middle" '
                 f'font-weight="bold" fill="{node.text}">{escape(_shorten(node.label))}</text>')
        lines = "".join(
            f'<text x="{node.x + _WIDTH // 2}" y="{node.y + 36 + 14 * i}" text-anchor="middle" '
            f'fill="{node.text}">{escape(_shorten(line, 36))}</text>'
            for i, line in enumerate(node.lines[:2]))
        body = (f'<g class="node node-{node.kind}" data-node="{escape(node.label)}">'
                f'<title>{escape(node.tooltip)}</title>{shape}{label}{lines}</g>')
        if node.href:
            body = f'<a href="{escape(node.href)}">{body}</a>'
        parts.append(body)
    parts.append("</svg>")
    return "".join(parts)
