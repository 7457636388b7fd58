"""A real redis-server for the Redis backend's tests, started and stopped by the tests themselves.

``redis_server`` (session scope) is one server on a free loopback port, with
no persistence, shared by every test; ``RedisServer(tmpdir, persistent=True)``
makes another one (append-only file, fsync on every write) for the test
that kills the server and starts it again on the same port, where nothing
acknowledged may be lost.

Without ``redis-server`` or the ``redis`` package the tests that need them
are skipped, except under CI (``CI`` set), where ``make test`` installs
both and a missing one is a failure.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process on 127.0.0.1; ``kill()`` (SIGKILL) and ``start()`` again on the same port."""

    def __init__(self, directory: str, *, persistent: bool = False, port: int | None = None):
        self.dir = directory
        self.persistent = persistent
        self.port = port or free_port()
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log")]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not _ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = ""
                try:
                    with open(os.path.join(self.dir, "redis.log")) as f:
                        log = f.read()[-2000:]
                except OSError:
                    pass
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}: {log}")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash: what was not fsynced is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def available() -> str | None:
    """Why the Redis tests cannot run here, or None."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (make test installs it: apt-get install redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis client is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="session")
def redis_server():
    why = available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    d = tempfile.mkdtemp(prefix="shm-redis-test-")
    srv = RedisServer(d).start()
    try:
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(d, ignore_errors=True)
