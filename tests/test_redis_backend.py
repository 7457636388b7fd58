"""What only the Redis backend has: URLs, reconnection, leases, claims, retries applied once.

Every test runs against real redis-server processes on loopback ports
(tests/_redis_server.py): the session's, or one of its own when it kills,
restarts or configures the server.
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import multiprocessing as mp
import pytest

import shm
from _redis_server import RedisServer, available

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LEASE = 2.0


@pytest.fixture
def ns(redis_server):
    n = shm.connect(redis_server.url, lease=LEASE, retry_for=10, claim_after=5)
    yield n
    import gc
    gc.collect()
    c = n._backend.client()
    left = c.keys("shm:*")
    if left:
        c.delete(*left)
        pytest.fail(f"the test left keys in Redis: {sorted(left)[:10]}")


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


# --------------------------------------------------------------------------
# URLs, options, the optional dependency.

def test_connect_urls_and_options(redis_server):
    local = shm.connect()
    assert local is shm.connect("shm://") and local.bounded is shm.bounded and local.SharedDict is shm.SharedDict
    assert local.Sender is shm.Sender and local.Queue is shm.Queue
    assert pickle.loads(pickle.dumps(local)) is local
    with pytest.raises(ValueError, match="redis://"):
        shm.connect("http://example.invalid")
    with pytest.raises(TypeError, match="unknown option"):
        shm.connect(redis_server.url, leese=1)
    with pytest.raises(ValueError):
        shm.connect(redis_server.url, lease=0)
    a = shm.connect(redis_server.url, lease=3)
    assert shm.connect(redis_server.url, lease=3) is a          # one pool per URL and options
    assert pickle.loads(pickle.dumps(a)) is a and a.ping() < 1
    with pytest.raises(ValueError, match="rendezvous"):
        a.bounded(0)
    with pytest.raises(ValueError, match="numeric mode"):
        a.SharedDict(key_type="int64", value_type="int64")
    assert "connect" in shm.__all__ and "BackendUnavailable" in shm.__all__


def test_library_imports_without_redis():
    code = ("import sys; sys.modules['redis'] = None\n"      # as if it were not installed
            "import shm\n"
            "ns = shm.connect('shm://'); tx, rx = ns.bounded(2); tx.send(1); assert rx.recv() == 1\n"
            "tx.close(); rx.close()\n"
            "try:\n"
            "    shm.connect('redis://127.0.0.1:1/0')\n"
            "except ImportError as e:\n"
            "    print('ImportError:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stderr
    assert "shm[redis]" in r.stdout


def test_password_in_url(tmp_path):
    if available():
        pytest.skip(available())
    srv = RedisServer(str(tmp_path))
    srv.start()
    try:
        import redis
        redis.Redis(port=srv.port).config_set("requirepass", "s3cret")
        good = shm.connect(f"redis://:s3cret@127.0.0.1:{srv.port}/1", lease=LEASE)
        d = good.SharedDict()
        d["k"] = "v"
        assert d["k"] == "v" and "s3cret" not in repr(d) and "***" in repr(d)
        d.close()
        bad = shm.connect(f"redis://:wrong@127.0.0.1:{srv.port}/1", lease=LEASE)
        with pytest.raises(shm.AccessDenied, match="credentials"):
            bad.SharedDict()
    finally:
        srv.stop()


def test_backend_unavailable_is_named_and_says_what_to_do():
    from _redis_server import free_port
    ns = shm.connect(f"redis://127.0.0.1:{free_port()}/0", retry_for=0.5)
    t0 = time.monotonic()
    with pytest.raises(shm.BackendUnavailable) as e:
        ns.bounded(4)
    assert 0.4 < time.monotonic() - t0 < 5
    msg = str(e.value)
    assert "could not be reached" in msg and "retry_for" in msg and "redis-server" in msg
    assert isinstance(e.value, shm.ShmError) and isinstance(e.value, ConnectionError)


# --------------------------------------------------------------------------
# Two processes that share nothing but the URL.

def test_two_processes_share_only_the_url(redis_server):
    tag = os.urandom(3).hex()
    chan, dname, n = f"jobs-{tag}", f"counts-{tag}", 1500
    w = os.path.join(HERE, "_redis_workers.py")
    cons = subprocess.Popen([sys.executable, w, "consumer", redis_server.url, chan, dname],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    prod = subprocess.Popen([sys.executable, w, "producer", redis_server.url, chan, dname, str(n)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    out_p, err_p = prod.communicate(timeout=120)
    out_c, err_c = cons.communicate(timeout=120)
    assert prod.returncode == 0, err_p + out_p
    assert cons.returncode == 0, err_c + out_c
    assert f"received {n} distinct, max {n - 1}" in out_c
    c = shm.connect(redis_server.url)._backend.client()
    assert not c.keys(f"shm:{{*{tag}}}*")          # both gone: the last one out deleted them


# --------------------------------------------------------------------------
# The server killed and restarted mid-run: reconnection, nothing acknowledged lost.

def test_server_killed_and_restarted_mid_run(tmp_path):
    if available():
        pytest.skip(available())
    srv = RedisServer(str(tmp_path), persistent=True).start()      # fsync on every write
    try:
        ns = shm.connect(srv.url, lease=5, retry_for=20)
        tx, rx = ns.bounded(50)
        d = ns.SharedDict()
        n = 1200
        sent, got, incrs, errors = [], [], [0], []

        def produce():
            try:
                for i in range(n):
                    tx.send(i)
                    sent.append(i)          # acknowledged by the server
                    d.incr("n")
                    incrs[0] += 1
                    time.sleep(0.001)
                tx.close()
            except Exception as e:
                errors.append(e)

        def consume():
            try:
                for m in rx:
                    got.append(m)
            except Exception as e:
                errors.append(e)

        tp, tc = threading.Thread(target=produce), threading.Thread(target=consume)
        tp.start(); tc.start()
        while len(sent) < n // 3:
            time.sleep(0.01)
        srv.kill()                          # SIGKILL mid-run
        at_kill = len(sent)
        time.sleep(0.7)
        srv.start()                         # same port, replays its append-only file
        tp.join(60); tc.join(60)
        assert not tp.is_alive() and not tc.is_alive()
        assert not errors, errors
        assert at_kill < n and sent == list(range(n))
        assert sorted(got) == list(range(n)) and got == sorted(got)      # all, once, in order
        assert d["n"] == incrs[0] == n                                  # no increment lost or doubled
        rx.close(); d.close()
    finally:
        srv.stop()


# --------------------------------------------------------------------------
# Dead peers: leases and claims.

def _read_then_die(rx):
    from shm import _redis_channel as C
    C.RedisReceiver._finish = lambda self, triples: os.kill(os.getpid(), signal.SIGKILL)    # dies before the ack
    rx.recv(timeout=20)


def test_message_of_a_killed_consumer_is_claimed_by_another(ns):
    tx, rx = ns.bounded(8)
    tx.send("precious")
    p = mp.get_context("fork").Process(target=_read_then_die, args=(rx.clone(),))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    assert len(rx) == 1                       # pending with the dead consumer, not lost
    t0 = time.monotonic()
    assert rx.recv(timeout=LEASE + 5) == "precious"     # claimed once the dead one's lease expired
    assert time.monotonic() - t0 < LEASE + 3
    assert rx.stats().recovered == 1 and len(rx) == 0
    with pytest.raises(shm.Empty):
        rx.recv(timeout=0.1)
    tx.close(); rx.close()


def test_a_claimed_message_is_not_returned_twice(ns):
    tx, rx = ns.bounded(8)
    slow = rx.clone()
    tx.send("once")
    r = slow._poll(1)                   # read, but not yet acknowledged: a stalled receiver
    assert r[0] == 1
    c = ns._backend.client()
    c.zrem(slow._zset(), slow._member)  # its lease lapsed (as if it stalled past it)
    assert rx.recv(timeout=5) == "once"
    assert slow._finish(r[1:]) == []    # it wakes up: the message was claimed, it does not return it
    slow.close(); tx.close(); rx.close()


def _send_then_die(tx):
    tx.send("last words")
    os.kill(os.getpid(), signal.SIGKILL)


def test_killed_sender_disconnects_within_the_lease(ns):
    tx, rx = ns.bounded(8)
    p = mp.get_context("fork").Process(target=_send_then_die, args=(tx,))
    p.start()
    tx.close()
    assert rx.recv(timeout=20) == "last words"
    t0 = time.monotonic()
    with pytest.raises(shm.Disconnected):
        rx.recv(timeout=30)
    assert time.monotonic() - t0 < LEASE + 2
    p.join(10)
    rx.close()


def _hold_forever(d, tx):
    time.sleep(60)


def test_leases_of_terminated_processes_expire_and_the_last_out_deletes(ns):
    d = ns.SharedDict()
    tx, rx = ns.unbounded()
    p = mp.get_context("fork").Process(target=_hold_forever, args=(d, tx))
    p.start()
    name = d.name
    time.sleep(0.2)
    p.kill()
    p.join(10)
    d.close(); tx.close(); rx.close()       # the killed child's leases are still live: an expiry is armed
    c = ns._backend.client()
    assert c.exists(f"shm:{{{name}}}")
    deadline = time.monotonic() + 3 * LEASE + 2
    while c.keys(f"shm:{{{name}}}*") or c.keys(f"shm:{{{tx.name}}}*"):
        assert time.monotonic() < deadline, c.keys("shm:*")
        time.sleep(0.1)


# --------------------------------------------------------------------------
# Retries: an operation whose reply was lost is applied once when retried.

def test_retried_operations_are_applied_once(ns, monkeypatch):
    tx, rx = ns.unbounded()
    d = ns.SharedDict()
    fixed = ("retry-test", "42")
    monkeypatch.setattr(tx, "_op", lambda: fixed)
    tx.send("a")
    tx.send("a")            # the same sequence number: a retry of the first
    assert len(rx) == 1
    monkeypatch.setattr(d._h, "_op", lambda: fixed)
    assert d.incr("n") == 1 and d.incr("n") == 1 and d["n"] == 1
    monkeypatch.undo()
    d["k"] = "v"
    monkeypatch.setattr(d._h, "_op", lambda: ("retry-test", "43"))
    assert d.pop("k") == "v" and d.pop("k") == "v"      # the retried pop still returns the value
    monkeypatch.undo()
    assert rx.recv() == "a" and len(rx) == 0
    tx.close(); rx.close(); d.close()


def test_incr_whose_reply_was_lost_after_the_server_applied_it_counts_once(ns, monkeypatch):
    # incr's int path sends a pre-packed EVALSHA on a pooled connection (Backend.run_packed): here
    # the server runs it, then the connection drops before the reply is read; the retry sends the
    # same bytes (same sequence number) and gets the stored reply instead of adding again.
    import redis
    d = ns.SharedDict()
    assert d.incr("n") == 1
    cls = ns._backend.client().connection_pool.connection_class
    real = cls.read_response
    lost = []

    def read_then_lose(self, *a, **k):
        r = real(self, *a, **k)
        if not lost:
            lost.append(r)
            self.disconnect()
            raise redis.exceptions.ConnectionError("the reply was lost (test)")
        return r
    monkeypatch.setattr(cls, "read_response", read_then_lose)
    assert d.incr("n", 5) == 6
    monkeypatch.undo()
    assert lost == [6] and d["n"] == 6          # applied by the server once, its reply lost once
    assert d.incr("n", -2) == 4 and d["n"] == 4
    ns._backend.client().script_flush()         # as after a server restart: loaded again, applied once
    assert d.incr("n") == 5 and d["n"] == 5
    d["big"] = 2**60                            # past 2^53 (Lua's doubles): the reply comes back as text
    assert d.incr("big") == 2**60 + 1 and d["big"] == 2**60 + 1
    monkeypatch.setattr(d._h, "_op", lambda: ("retry-test", "7"))
    assert d.incr("big", 2) == 2**60 + 3 and d.incr("big", 2) == 2**60 + 3     # a replay, past 2^53
    monkeypatch.undo()
    assert d["big"] == 2**60 + 3
    d.close()


def test_lost_reply_of_a_read_is_read_again(ns):
    tx, rx = ns.unbounded()
    tx.send_many(["x", "y"])
    r = rx._poll(1)                 # the server delivered "x"; pretend the reply never came
    assert r[0] == 1
    rx._recheck = True              # what a connection error in the read sets
    assert rx.recv(timeout=5) == "x" and rx.recv(timeout=5) == "y"
    tx.close(); rx.close()


def test_pickle_is_never_decoded_on_a_msgpack_channel(ns):
    tx, rx = ns.bounded(4)
    c = ns._backend.client()
    c.xadd(f"shm:{{{tx.name}}}:q", {b"2": pickle.dumps(object())})     # a pickle kind, written by hand
    with pytest.raises(shm.DecodeError):
        rx.recv(timeout=5)
    tx.send("fine")
    assert rx.recv(timeout=5) == "fine"
    d = ns.SharedDict()
    c.hset(f"shm:{{{d.name}}}:h", b"sk", b"k\x02" + pickle.dumps(1))
    with pytest.raises(shm.DecodeError):
        d["k"]
    tx.close(); rx.close(); d.close()


def test_spawned_child_gets_handles_by_pickle(redis_server):
    # A handle in transit counts for one lease: 60 s here, not the suite's 2, so a
    # spawned child slow to start on a loaded machine (it imports numba) never
    # finds the channel already disconnected (it did once, under load).
    ns = shm.connect(redis_server.url, lease=60, retry_for=10, claim_after=5)
    tx, rx = ns.bounded(4)
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_send_then_exit, args=(tx,))
    p.start()
    tx.close()                      # the handle in transit still counts
    assert rx.recv(timeout=60) == "from spawn"
    with pytest.raises(shm.Disconnected):
        rx.recv(timeout=30)         # the child exited: its sender is closed at exit
    p.join(30)
    assert p.exitcode == 0
    rx.close()
    left = ns._backend.client().keys("shm:*")
    assert not left, f"the test left keys in Redis: {sorted(left)[:10]}"


def _send_then_exit(tx):
    tx.send("from spawn")
