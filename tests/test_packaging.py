"""Packaging: the core needs nothing Redis-specific, the sdist carries its tests, the demo
cleans up after itself and keeps its Celery messages to itself."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import threading
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
REDIS_PACKAGES = {"redis", "django-redis", "python-redis-lock"}

#: Run first in a subprocess: importing redis, redis_lock or django_redis fails.
BLOCK_REDIS = textwrap.dedent("""
    import sys

    class BlockRedis:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("redis", "redis_lock", "django_redis"):
                raise ImportError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, BlockRedis())
""")


def run_python(code, cwd, env=None, timeout=180):
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith(("DJANGO_", "TRIGGERS_TEST_"))}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def requirement_names(requirements):
    return {requirement.split("[")[0].split(">")[0].split("<")[0].split("=")[0].split(";")[0]
            .strip().lower() for requirement in requirements}


# -- installing without Redis --------------------------------------------------------------


def test_the_core_runs_without_any_redis_package(tmp_path):
    """With redis, redis_lock and django_redis unimportable, the core imports and fires on
    the memory and database storages (the demo's workflow, to the end)."""
    code = BLOCK_REDIS + textwrap.dedent("""
        import io, json
        import triggers, triggers.manager, triggers.signals
        import triggers.storages.database, triggers.storages.memory, triggers.storages.cache
        import triggers.storages.redis, triggers.locking, triggers.runners, triggers.testing

        from triggers.contrib.demo import CONFIGURATION, EVENTS, run_demo

        output = io.StringIO()
        database_finalized = run_demo(output)  # the database storage, threading runner

        from triggers.manager import FinalizingTriggerManager
        from triggers.runners import ThreadingTaskRunner
        from triggers.storages.memory import MemoryStorageBackend
        from triggers.testing import use_threading_runner

        manager = FinalizingTriggerManager(MemoryStorageBackend("no-redis", namespace="packaging"))
        manager.update_configuration(CONFIGURATION)
        with use_threading_runner():
            for name, kwargs in EVENTS:
                manager.fire(name, kwargs)
            ThreadingTaskRunner.join_all()
        memory = {i.name: i.status.value for i in manager.storage}

        errors = {}
        from triggers.storages.redis import RedisStorageBackend
        try:
            RedisStorageBackend("no-redis", url="redis://127.0.0.1:6379/0")
        except ImportError as exc:
            errors["redis"] = str(exc)
        from triggers.contrib import demo
        try:
            demo.run_demo(io.StringIO(), celery=True)
        except ImportError as exc:
            errors["demo"] = str(exc)
        loaded = sorted(m for m in sys.modules
                        if m.partition(".")[0] in ("redis", "redis_lock", "django_redis"))
        print(json.dumps({"database": database_finalized, "memory": memory, "errors": errors,
                          "loaded": loaded}))
    """)
    result = run_python(code, tmp_path, {"TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["database"] is True
    assert set(outcome["memory"].values()) == {"finished"}
    assert len(outcome["memory"]) == 6
    assert outcome["loaded"] == []
    for error in outcome["errors"].values():
        assert "pip install 'triggers[redis]'" in error
    assert "'redis'" in outcome["errors"]["redis"]
    assert "demo" in outcome["errors"]


def test_the_dependencies_leave_redis_to_its_extra():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the sdist test checks 3.10 too
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["build-system"]["requires"] == ["setuptools>=77"]
    metadata = project["project"]
    assert not requirement_names(metadata["dependencies"]) & REDIS_PACKAGES
    extras = metadata["optional-dependencies"]
    assert requirement_names(extras["redis"]) >= REDIS_PACKAGES | {"celery"}
    assert any(item.startswith("celery[redis]") for item in extras["redis"])
    # The test suite needs everything: the redis extra's packages too.
    assert set(extras["redis"]) <= set(extras["test"])
    assert set(metadata["urls"]) >= {"Documentation", "Source", "Changelog"}
    assert metadata["license-files"] == ["LICENSE"]
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert "The triggers developers" in (ROOT / "LICENSE").read_text()


# -- the sdist -----------------------------------------------------------------------------

IGNORED = shutil.ignore_patterns(".git", ".venv", "*.egg-info", "__pycache__", ".mypy_cache",
                                 ".ruff_cache", ".pytest_cache", "build", "dist", "_build",
                                 "*.sqlite3", "*.sqlite3-journal", "artifacts", "results")


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The sdist built from a copy of the working tree (python -m build --sdist)."""
    directory = tmp_path_factory.mktemp("sdist")
    source = directory / "source"
    shutil.copytree(ROOT, source, ignore=IGNORED)
    result = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation",
                             "--outdir", str(directory / "dist"), str(source)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (archive,) = (directory / "dist").glob("triggers-*.tar.gz")
    return archive


def test_the_sdist_carries_the_tests_the_docs_and_the_license(sdist):
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
        top = names[0].split("/")[0]
        files = {name[len(top) + 1:] for name in names if "/" in name}
        pkg_info = archive.extractfile(f"{top}/PKG-INFO").read().decode()
    for expected in ("conftest.py", "tests/conftest.py", "tests/settings.py", "tests/app/tasks.py",
                     "tests/testdist/pyproject.toml", "tests/urls_async.py", "manage.py",
                     "docs/index.rst", "docs/conf.py", "LICENSE", "README.rst", "tox.ini",
                     "triggers/signals.py", "triggers/py.typed"):
        assert expected in files, expected
    assert not [name for name in files if name.endswith((".pyc", ".sqlite3"))
                or "__pycache__" in name or "artifacts" in name]
    assert "License-Expression: MIT" in pkg_info
    assert "License-File: LICENSE" in pkg_info
    for label in ("Documentation", "Source", "Changelog"):
        assert f"Project-URL: {label}, https://" in pkg_info
    requires = [line.split(":", 1)[1].strip() for line in pkg_info.splitlines()
                if line.startswith("Requires-Dist:")]
    for requirement in requires:
        if requirement_names([requirement]) & REDIS_PACKAGES:
            assert 'extra == "redis"' in requirement or 'extra == "test"' in requirement


def test_the_sdist_test_suite_is_complete(sdist, tmp_path):
    """The unpacked sdist imports its own code, passes Django's checks and collects every
    test module of the working tree, and the examples of README.rst and docs/."""
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path, filter="data")
    (unpacked,) = tmp_path.glob("triggers-*")
    env = {"PYTHONPATH": str(unpacked), "DJANGO_SETTINGS_MODULE": "tests.settings"}
    result = run_python("import triggers; print(triggers.__file__)", unpacked, env)
    assert result.stdout.strip() == str(unpacked / "triggers" / "__init__.py"), result.stderr
    result = run_python("import sys; from django.core.management import execute_from_command_line;"
                        " execute_from_command_line(['manage.py', 'check'])", unpacked, env)
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                             "-p", "no:randomly"], cwd=unpacked,
                            env={**os.environ, **env}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    collected = {line.split("::")[0] for line in result.stdout.splitlines() if "::" in line}
    expected = {f"tests/{path.name}" for path in (ROOT / "tests").glob("test_*.py")}
    expected |= {str(path.relative_to(ROOT)) for path in [ROOT / "README.rst",
                                                          *(ROOT / "docs").glob("*.rst")]
                 if ".. code-block:: python" in path.read_text() or ">>> " in path.read_text()}
    assert collected == expected


# -- the demo -------------------------------------------------------------------------------


def test_the_demo_removes_its_temporary_files(tmp_path):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(temporary),
           "TRIGGERS_DEMO_REDIS_URL": "redis://127.0.0.1:1/0"}
    result = subprocess.run([sys.executable, "-m", "triggers.demo"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Session finalized: yes" in result.stdout
    assert list(temporary.iterdir()) == []


def test_the_celery_demo_uses_a_queue_of_its_own(tmp_path):
    """Another consumer of the broker's default queue takes none of the demo's messages; the
    demo's queue and temporary files are gone afterwards."""
    url = os.environ.get("TRIGGERS_DEMO_REDIS_URL", "redis://127.0.0.1:6379/11")
    client = redis.Redis.from_url(url)
    stolen = []
    stop = threading.Event()

    def thief():
        while not stop.is_set():
            message = client.brpop(["celery"], timeout=0.2)
            if message is not None:
                stolen.append(message)

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "TMPDIR": str(temporary), "TRIGGERS_DEMO_REDIS_URL": url}
    thread = threading.Thread(target=thief, daemon=True)
    thread.start()
    try:
        result = subprocess.run([sys.executable, "-m", "triggers.demo", "--celery"],
                                cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=180)
    finally:
        stop.set()
        thread.join(5)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Session finalized: yes; unresolved tasks: none" in result.stdout
    assert stolen == []
    (line,) = [line for line in result.stdout.splitlines() if "Celery worker started" in line]
    queue = line.rsplit("queue ", 1)[1].rstrip(")")
    assert queue.startswith("triggers-demo-")
    assert not client.exists(queue, f"_kombu.binding.{queue}")
    assert list(temporary.iterdir()) == []
