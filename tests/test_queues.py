"""shm.Queue / SimpleQueue / JoinableQueue as drop-ins for multiprocessing's."""
from __future__ import annotations

import os
import queue
import subprocess
import sys
import time

import pytest

import shm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = os.path.join(ROOT, "examples", "queue_program.py")
ONE_LINE = "from multiprocessing import JoinableQueue, Queue  # the one line to change"


def _run(source: str, method: str, tmp_path) -> str:
    path = tmp_path / f"program_{abs(hash(source))}.py"
    path.write_text(source)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(path), method], capture_output=True, text=True,
                       timeout=240, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_classic_program_runs_both_ways(method, tmp_path):
    source = open(PROGRAM).read()
    assert source.count(ONE_LINE) == 1
    with_mp = _run(source, method, tmp_path)
    with_shm = _run(source.replace(ONE_LINE, "from shm import JoinableQueue, Queue"), method, tmp_path)
    assert with_shm == with_mp
    assert "mul(19, 7) = 133" in with_shm and "plus(9, 8) = 17" in with_shm


def test_queue_api():
    q = shm.Queue(maxsize=2)
    assert (q.qsize(), q.empty(), q.full()) == (0, True, False)
    q.put({"a": (1, 2)})          # pickle codec: tuples stay tuples
    q.put_nowait({1, 2})
    assert (q.qsize(), q.empty(), q.full()) == (2, False, True)
    with pytest.raises(queue.Full):
        q.put_nowait(3)
    with pytest.raises(queue.Full):
        q.put(3, timeout=0.05)
    with pytest.raises(queue.Full):
        q.put(3, block=False)
    assert q.get() == {"a": (1, 2)}
    assert q.get_nowait() == {1, 2}
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.05)
    with pytest.raises(queue.Empty):
        q.get(False)
    with pytest.raises(ValueError):
        q.get(timeout=-1)
    q.join_thread()
    q.cancel_join_thread()
    q.close()
    with pytest.raises(ValueError, match="closed"):
        q.put(1)
    with pytest.raises(ValueError, match="closed"):
        q.get()
    assert "closed" in repr(q)


def test_unbounded_queue_and_simple_queue():
    q = shm.Queue()
    for i in range(1000):
        q.put_nowait(i)
    assert q.qsize() == 1000 and not q.full()
    assert [q.get() for _ in range(1000)] == list(range(1000))
    q.close()
    sq = shm.SimpleQueue()
    assert sq.empty()
    sq.put([1, "x"])
    assert not sq.empty() and sq.get() == [1, "x"]
    sq.close()


def test_joinable_queue_counts():
    q = shm.JoinableQueue()
    assert q.join(timeout=0) is True
    q.put(1)
    q.put(2)
    assert q.unfinished_tasks == 2
    assert q.join(timeout=0.05) is False
    q.get(); q.task_done()
    q.get(); q.task_done()
    assert q.join(timeout=5) is True
    with pytest.raises(ValueError, match="too many"):
        q.task_done()
    assert q.unfinished_tasks == 0
    q.close()


def _consume_and_finish(q, n):
    for _ in range(n):
        q.get(timeout=60)
        time.sleep(0.001)
        q.task_done()


def test_joinable_queue_join_wakes_across_processes(ctx):
    q = shm.JoinableQueue()
    for i in range(20):
        q.put(i)
    p = ctx.Process(target=_consume_and_finish, args=(q, 20))
    p.start()
    assert q.join(timeout=120) is True
    p.join(30)
    assert p.exitcode == 0
    q.close()


def _put_by_name(name, items):
    q = shm.Queue.open(name)
    for x in items:
        q.put(x)
    q.close()


def test_queue_open_by_name(ctx):
    name = "shmq-" + os.urandom(4).hex()
    q = shm.Queue(name=name)
    p = ctx.Process(target=_put_by_name, args=(name, ["a", ("b",)]))
    p.start()
    assert [q.get(timeout=60), q.get(timeout=60)] == ["a", ("b",)]
    p.join(30)
    q.close()


def _get_one(q, out):
    out.put(q.get(timeout=60))


def test_forked_getter_keeps_queue_open():
    """A forked child that only gets still counts as a possible putter (no Disconnected)."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    q, out = shm.Queue(), shm.Queue()
    p = ctx.Process(target=_get_one, args=(q, out))
    p.start()
    time.sleep(0.2)
    q.put("late")                   # the parent still puts after the child started getting
    assert out.get(timeout=60) == "late"
    p.join(30)
    q.close(); out.close()
