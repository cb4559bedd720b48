"""Real Celery worker processes for the tests, started and stopped by PID."""

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from django.conf import settings

ROOT = Path(__file__).resolve().parent.parent
RABBITMQ_START = "rabbitmq-server -detached"


def broker_reachable(timeout=3.0):
    from kombu import Connection

    try:
        with Connection(settings.CELERY_BROKER_URL, connect_timeout=timeout) as connection:
            connection.ensure_connection(max_retries=1)
        return True
    except Exception:  # noqa: BLE001
        return False


class Worker:
    """A `celery worker` process (prefork pool) consuming this test run's queues."""

    def __init__(self, concurrency=4, queues=None, extra_args=(), lease=None, acks_late=False,
                 env=None):
        self.env = dict(env or {})  # more environment (another broker, settings)
        self.lease = lease  # TRIGGERS['LEASE'] of the worker, if not the default
        self.acks_late = acks_late  # task_acks_late and task_reject_on_worker_lost
        self.name = f"w{uuid.uuid4().hex[:6]}@%h"
        self.queues = queues or [settings.TEST_QUEUE, f"{settings.TEST_QUEUE}-routed"]
        self.concurrency = concurrency
        self.extra_args = list(extra_args)
        handle, path = tempfile.mkstemp(prefix="triggers-worker-", suffix=".log")
        os.close(handle)
        self.log_path = Path(path)
        self.process = None

    @property
    def pid(self):
        return self.process.pid

    def start(self, timeout=60):
        if not broker_reachable():
            pytest.fail(f"RabbitMQ is not reachable at {settings.CELERY_BROKER_URL}. "
                        f"Start it with: {RABBITMQ_START}")
        env = dict(os.environ)
        env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
        env["TRIGGERS_TEST_QUEUE"] = settings.TEST_QUEUE
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        if self.lease is not None:
            env["TRIGGERS_TEST_LEASE"] = str(self.lease)
        if self.acks_late:
            env["TRIGGERS_TEST_ACKS_LATE"] = "1"
        env.update(self.env)
        command = [
            sys.executable, "-m", "celery", "-A", "tests.celery", "worker",
            "--pool", "prefork", "--concurrency", str(self.concurrency),
            "--queues", ",".join(self.queues), "--hostname", self.name,
            "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--prefetch-multiplier", "1", *self.extra_args,
        ]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"The Celery worker exited at start:\n{self.log()}")
            if " ready." in self.log():
                return self
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"The Celery worker did not become ready within {timeout} s:\n{self.log()}")

    def log(self):
        return self.log_path.read_text(errors="replace")

    def children(self):
        """PIDs of the pool processes."""
        try:
            out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True)
        except FileNotFoundError:  # pragma: no cover - procps is on the machine
            return []
        return [int(pid) for pid in out.stdout.split()]

    def kill(self):
        """SIGKILL the whole worker (main process and pool), as a crash would."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)

    def stop(self, timeout=30):
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


class Sweeper:
    """A ``manage.py triggers sweep --loop`` process (as deployments without beat run it)."""

    def __init__(self, interval=0.5, storage="cache", settings_json=None, env=None):
        self.command = [sys.executable, "manage.py", "triggers", "sweep", "--loop",
                        "--interval", str(interval), "--storage", storage]
        self.env = dict(os.environ)
        self.env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
        self.env["TRIGGERS_TEST_QUEUE"] = settings.TEST_QUEUE
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                             self.env.get("PYTHONPATH")]))
        if settings_json:
            self.env["TRIGGERS_TEST_SETTINGS"] = settings_json
        self.env.update(env or {})
        handle, path = tempfile.mkstemp(prefix="triggers-sweep-", suffix=".log")
        os.close(handle)
        self.log_path = Path(path)
        self.process = None

    def start(self):
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return self

    def log(self):
        return self.log_path.read_text(errors="replace")

    def stop(self):
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)


def wait_for(predicate, timeout=30, interval=0.05, message="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"Timed out after {timeout} s waiting for {message}")
