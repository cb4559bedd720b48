"""A real 3-master Redis Cluster on loopback ports, started and stopped by PID."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import redis

START_HINT = ("the tests start `redis-server --cluster-enabled yes` three times and "
              "`redis-cli --cluster create`; install Debian's redis-server and redis-tools")


def _free(port):
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port():
    """A free port whose cluster bus port (+10000) is free too (Redis needs both ≤ 65535)."""
    import random

    for _ in range(200):
        port = random.randrange(20000, 40000)
        if _free(port) and _free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _cluster_ok(client):
    info = client.execute_command("CLUSTER INFO")
    if isinstance(info, dict):
        return info.get("cluster_state") == "ok"
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text


class RedisCluster:
    """Three masters, no replicas (``redis-cli --cluster create … --cluster-replicas 0``)."""

    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="triggers-cluster-")
        self.ports = []
        self.processes = []

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self, timeout=60):
        for tool in ("redis-server", "redis-cli"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not on PATH: {START_HINT}")
        for _ in range(3):
            port = free_port()
            node_dir = os.path.join(self.directory, str(port))
            os.makedirs(node_dir)
            process = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--dir", node_dir, "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            self.ports.append(port)
            self.processes.append(process)
        deadline = time.monotonic() + timeout
        for port in self.ports:
            client = redis.Redis(port=port)
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"Redis node :{port} did not start") from None
                    time.sleep(0.1)
        created = subprocess.run(
            ["redis-cli", "--cluster", "create",
             *[f"127.0.0.1:{port}" for port in self.ports],
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout)
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}"
                               f"{created.stderr}")
        for port in self.ports:
            client = redis.Redis(port=port)
            while not _cluster_ok(client):
                if time.monotonic() > deadline:
                    raise RuntimeError("the Redis Cluster did not become ready")
                time.sleep(0.1)
        return self

    def node_for_key(self, key):  # noqa: D401
        """The port of the master that holds ``key``."""
        client = redis.Redis(port=self.ports[0])
        slot = client.execute_command("CLUSTER KEYSLOT", key)
        for start, end, master, *_replicas in client.execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                return master[1]
        raise LookupError(key)

    def stop(self):
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


_shared = None


def shared_cluster():
    """The cluster of this test run: started on first use, stopped when the process exits.

    Its URL goes to ``TRIGGERS_TEST_CLUSTER_URL``, which child processes inherit.
    """
    global _shared
    if _shared is None:
        import atexit

        cluster = RedisCluster()
        try:
            cluster.start()
        except BaseException:
            cluster.stop()
            raise
        atexit.register(cluster.stop)
        os.environ["TRIGGERS_TEST_CLUSTER_URL"] = cluster.url
        _shared = cluster
    return _shared
