"""The workflow graph (triggers.graph): cycles, OR conditions, self-loops, no tasks."""

import re

from triggers.graph import workflow_svg
from triggers.types import TaskConfig, TaskInstance


def configs(entries):
    return {name: TaskConfig.from_dict(name, entry) for name, entry in entries.items()}


def x_of(svg, node):
    return int(re.search(rf'data-node="{node}"><title>[^<]*</title><rect x="(\d+)"', svg)[1])


def test_a_cycle_stays_next_to_what_leads_to_it():
    entries = {f"t{i}": {"after": ["go"] if i == 0 else [f"t{i - 1}"], "run": "x"}
               for i in range(20)}
    entries["a"] = {"after": ["go", "b"], "run": "x"}
    entries["b"] = {"after": ["a"], "run": "x"}
    svg = workflow_svg(configs(entries), [])
    assert x_of(svg, "a") < x_of(svg, "b") < x_of(svg, "t3")
    assert "b → a (after)" in svg  # the edge that closes the cycle is drawn


def test_or_conditions_self_loops_and_no_tasks():
    tasks = configs({"t": {"after": ["a", {"any": ["b", "c"]}], "run": "x"},
                     "s": {"after": ["s"], "andEvery": "s", "run": "x"}})
    svg = workflow_svg(tasks, [TaskInstance("t#0", tasks["t"], {"a": {}})])
    assert "b → t (or)" in svg and "c → t (or)" in svg and "a → t (after)" in svg
    assert "waits for (b | c)" in svg
    assert "s → s (after)" in svg
    loop = re.search(r'd="(M[^"]*)"[^>]*><title>s → s', svg)[1]
    assert len(set(re.findall(r"[\d.]+,[\d.]+", loop))) > 2  # a visible loop, not a point
    assert "No tasks are configured." in workflow_svg({}, [])


def test_names_are_escaped():
    tasks = configs({"t": {"after": ['"><script>alert(1)</script>'], "run": "x"}})
    svg = workflow_svg(tasks, [])
    assert "<script>" not in svg and "&lt;script&gt;" in svg
