"""The scripts of docs/eventor.rst, run as its reader runs them: saved as files in a
directory of their own and run by Python, outside any Django project."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

PAGE = Path(__file__).resolve().parents[2] / "docs" / "eventor.rst"

_BLOCK = re.compile(r"^\.\. code-block:: (?P<language>\w+)\n(?:[ \t]+:.*\n)*\n"
                    r"(?P<body>(?:(?:[ \t]+.*)?\n)+)", re.MULTILINE)


def code_block(after, language="python"):
    """The text of the first ``.. code-block:: <language>`` of the page after ``after``."""
    text = PAGE.read_text()
    for match in _BLOCK.finditer(text, text.index(after)):
        if match.group("language") == language:
            return textwrap.dedent(match.group("body")).strip("\n") + "\n"
    raise LookupError(f"no {language} block after {after!r}")


def run_script(directory, name, code, *args):
    """Save ``code`` as ``directory/name`` and run ``python name *args`` there; its output
    (stdout and stderr, interleaved)."""
    (Path(directory) / name).write_text(code)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("DJANGO_", "TRIGGERS_"))}
    result = subprocess.run([sys.executable, name, *args], cwd=directory, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120,
                            check=False)
    return result.stdout


def without_times(lines):
    """Log lines without their time stamps (``[ 2026-12-02 06:02:15,555 ]``)."""
    return [re.sub(r"^\[ \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \]", "[ TIME ]", line)
            for line in lines]


def shown_output(after, command):
    """The lines the page shows after ``$ <command>`` in the first text block after
    ``after``, up to the next command (without time stamps)."""
    lines = code_block(after, "text").splitlines()
    if command is None:
        return without_times(lines)
    start = lines.index(f"$ {command}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("$ ")), len(lines))
    while lines[end - 1] == "":
        end -= 1
    return without_times(lines[start:end])


def condensed(lines):
    """Log lines without time stamps and without the frames of tracebacks (the page
    shortens them to ``...``)."""
    return [line for line in without_times(lines) if not line.startswith((" ", "\t"))]
