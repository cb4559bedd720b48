"""Shared fixtures: real services, fresh sessions, the threading runner."""

import shutil
import signal
import subprocess
import tempfile
import uuid

import pytest
import redis
from django.conf import settings

from triggers.runners import ThreadingTaskRunner


def pytest_collection_modifyitems(items):
    """Tests run on a database storage kind get the (transactional) test databases."""
    from tests.helpers import DB_KINDS

    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        values = [value for value in params.values() if isinstance(value, str)]
        if any(value in DB_KINDS for value in values):
            item.add_marker(pytest.mark.django_db(transaction=True,
                                                  databases=["default", "postgres"]))


@pytest.fixture(scope="session")
def redis_cluster():
    """The run's real 3-master Redis Cluster on loopback ports (started and stopped by PID)."""
    from tests.cluster import shared_cluster

    try:
        return shared_cluster()
    except RuntimeError as exc:
        pytest.fail(f"Could not start a Redis Cluster: {exc}")

REDIS_START = ('redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" '
               "--appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log")


@pytest.fixture(scope="session", autouse=True)
def redis_server():
    """The real Redis must be reachable: the cache storage is tested against it."""
    client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.exit(
            f"Redis is not reachable at {settings.REDIS_URL} ({exc}). Start it with:\n"
            f"  {REDIS_START}",
            returncode=3,
        )
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(scope="session", autouse=True)
def postgres_server():
    """The real PostgreSQL must be reachable: the database storage is tested against it."""
    import socket

    database = settings.DATABASES["postgres"]
    try:
        socket.create_connection((database["HOST"], int(database["PORT"])), timeout=2).close()
    except OSError as exc:
        pytest.exit(
            f"PostgreSQL is not reachable at {database['HOST']}:{database['PORT']} ({exc}). "
            "Start it with:\n  pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) "
            "main start",
            returncode=3,
        )


@pytest.fixture
def uid():
    """A fresh session UID."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(autouse=True)
def _join_runner_threads():
    """No runner thread outlives its test."""
    yield
    ThreadingTaskRunner.join_all(timeout=30)


#: Port of the Redis server that fault tests start, kill and restart themselves.
RESTART_PORT = 6391


@pytest.fixture
def own_redis():
    """A Redis server of this test's own (port 6391), persistent across its restarts."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not on PATH; install Debian's redis-server package")
    directory = tempfile.mkdtemp(prefix="triggers-redis-")

    class Server:
        process = None

        def start(self):
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(RESTART_PORT), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                 "--dir", directory], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            client = redis.Redis(port=RESTART_PORT)
            __import__('tests.workers', fromlist=['wait_for']).wait_for(
                lambda: _pings(client), timeout=20, message="the test's Redis server")

        def kill(self):
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

        def stop(self):
            if self.process and self.process.poll() is None:
                self.process.terminate()
                self.process.wait(10)

    server = Server()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


def _pings(client):
    try:
        return client.ping()
    except redis.RedisError:
        return False


@pytest.fixture
def admin_client_(client):
    """The test client logged in as a superuser (admin pages)."""
    from django.contrib.auth.models import User

    user = User.objects.create_superuser("admin", "admin@example.org", "secret-password")
    client.force_login(user)
    return client
