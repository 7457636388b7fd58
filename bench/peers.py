"""The channel peers, behind one small interface.

A ``Peer`` makes an ``Endpoint`` in the parent (before the fork) for a
``Spec``; children then open its ends:

* ``ep.sender(k)`` (producer ``k``) -> ``Tx`` with ``send(m)``, maybe
  ``send_many(list)``, ``finish()`` (multi-consumer end of stream) and
  ``close()``;
* ``ep.receiver(j)`` (consumer ``j``) -> ``Rx`` with ``recv()``, maybe
  ``recv_many()``, and ``close()``.

Opening an end never blocks. ``settle()`` then does whatever handshake the
peer needs before data may flow (a role settles its receivers, then its
senders, then waits on the run's barrier):

* pyzmq: a sender waits until every receiver has bound its ipc:// socket
  (a PUSH that connects first retries only every ``reconnect_ivl``).
* iceoryx2: a receiver waits until the publisher exists and calls
  ``receive()`` once to connect to it, then the publisher refreshes its
  connections. (A publisher's ``send`` before that delivers to no one and
  returns 0 without an error; every send here checks that return value.)

Each hot-loop callable is the peer's own bound method where its API allows
(``tx.send``, ``q.put``, ``sock.send``, ``conn.send_bytes``), so no wrapper
call is added to anyone's per-message cost except where the peer's Python
API needs several calls per message (iceoryx2: loan, copy, send).

End of stream with several producers and consumers:

* shared queues (shm, mp.Queue, SimpleQueue, faster-fifo): the last
  producer to finish (after flushing: ``mp.Queue``'s feeder thread) sends one
  empty message per consumer; FIFO order puts them behind every data message;
* pyzmq: each producer owns one PUSH socket per consumer and deals messages
  round robin (what one PUSH connected to both would do, minus skipping a
  full peer), then sends an empty message on each; a consumer stops after
  one from every producer.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass

from .common import CTX, RunError, Unavailable

BATCH = 256          # messages per send_many/put_many and recv_many/get_many call
SENTINEL = b""       # end-of-stream marker (multi-consumer runs carry bytes only)


@dataclass(frozen=True)
class Spec:
    size: int = 64            # payload bytes (objects: ignored)
    cap: int = 1024           # queue capacity in messages (bounded peers)
    objects: bool = False     # dict-shaped Python objects instead of bytes
    producers: int = 1
    consumers: int = 1


def _ident(x):
    return x


class Tx:
    send = None
    send_many = None

    def settle(self):
        pass

    def finish(self):
        pass

    def close(self):
        pass


class Rx:
    recv = None
    recv_many = None

    def settle(self):
        pass

    def close(self):
        pass


class Endpoint:
    stops_needed = 1          # end-of-stream markers a consumer waits for (multi-consumer)
    shm_prefixes: tuple = ()  # /dev/shm names this endpoint may leave behind
    leak_is_bug = False       # True for shm itself: anything left is a bug to report

    def __init__(self, spec: Spec):
        self.spec = spec

    def after_start(self):
        """Parent, once the children are started (drop the parent's own handles)."""

    def destroy(self):
        """Parent, once the children are gone."""


class SharedEndpoint(Endpoint):
    """A queue every producer and consumer shares: the last producer out sends the markers."""

    def __init__(self, spec):
        super().__init__(spec)
        self._finished = CTX.Value("i", 0)    # producers done sending data
        self._flushed = CTX.Value("i", 0)     # of those, the ones whose data is in the queue

    def finish(self, send, flush=None):
        """End of stream: the last producer to finish sends one marker per consumer.

        ``flush`` (mp.Queue: close + join the feeder thread) makes a producer's
        data reach the queue; only the other producers flush (the last one still
        has to send), and the last one waits for them first, so every marker is
        queued behind every data message.
        """
        if self.spec.consumers <= 1 and self.spec.producers <= 1:
            return
        with self._finished.get_lock():
            self._finished.value += 1
            last = self._finished.value == self.spec.producers
        if not last:
            if flush is not None:
                flush()
            with self._flushed.get_lock():
                self._flushed.value += 1
            return
        deadline = time.monotonic() + 60
        while self._flushed.value < self.spec.producers - 1:
            if time.monotonic() > deadline:
                raise RunError("another producer never flushed its data")
            time.sleep(0.0005)
        for _ in range(self.spec.consumers):
            send(SENTINEL)


class Peer:
    key = "?"
    name = "?"
    mpmc = True               # competing consumers supported
    batched = False           # has a batched API (used by the batched case)
    note = ""

    def check(self):
        """Raise Unavailable if this peer cannot run here."""

    def endpoint(self, spec: Spec) -> Endpoint:
        raise NotImplementedError


# --------------------------------------------------------------------------
# shm

class _ShmEnd(SharedEndpoint):
    leak_is_bug = True

    def __init__(self, spec, codec, slot_size, zero_copy=False, reserve=False):
        super().__init__(spec)
        import shm
        self.zero_copy = zero_copy
        self.tx, self.rx = shm.bounded(spec.cap, codec=codec, slot_size=slot_size,
                                       reserve=spec.size if reserve else 0)
        self.shm_prefixes = (self.tx.name,)

    def after_start(self):
        self.tx.close()
        self.rx.close()

    def sender(self, k):
        t = Tx()
        tx = self.tx
        t.send = tx.send
        t.send_many = tx.send_many
        t.finish = lambda: self.finish(tx.send)
        t.close = tx.close
        t.handle = tx
        return t

    def receiver(self, j):
        r = Rx()
        rx = self.rx
        r.recv = rx.recv
        if self.zero_copy:
            view = rx.recv_view

            def recv():
                # Like iceoryx2's zero-copy read: take the message in place,
                # note its length, give the slot back.
                v = view()
                n = len(v)
                v.release()
                return n
            r.recv = recv
        r.recv_many = functools.partial(rx.recv_many, BATCH)
        r.close = rx.close
        r.handle = rx
        return r


class ShmPeer(Peer):
    key = "shm"
    name = "shm"
    batched = True

    def __init__(self, codec=None, slot_size=None, key=None, name=None, note="", zero_copy=False,
                 reserve=False):
        self.codec = codec
        self.slot_size = slot_size
        self.zero_copy = zero_copy
        self.reserve = reserve      # bounded(reserve=message size), as iceoryx2 gets initial_max_slice_len
        if key:
            self.key = key
        if name:
            self.name = name
        self.note = note

    def check(self):
        import shm  # noqa: F401

    def endpoint(self, spec):
        codec = self.codec or ("msgpack" if spec.objects else "bytes")
        return _ShmEnd(spec, codec, self.slot_size, self.zero_copy, self.reserve)


# --------------------------------------------------------------------------
# multiprocessing

class _MpQueueEnd(SharedEndpoint):
    def __init__(self, spec, bounded):
        super().__init__(spec)
        self.q = CTX.Queue(maxsize=spec.cap if bounded else 0)

    def sender(self, k):
        t = Tx()
        q = self.q

        def flush():
            q.close()          # flush the feeder thread's buffer into the pipe
            q.join_thread()

        t.send = q.put
        t.finish = lambda: self.finish(q.put, flush)
        return t

    def receiver(self, j):
        r = Rx()
        r.recv = self.q.get
        return r

    def destroy(self):
        self.q.close()


class MpQueuePeer(Peer):
    key = "mp.Queue"
    name = "mp.Queue"
    note = "unbounded (the usual use) except for 1 MiB and 64 MiB messages: maxsize=capacity there"

    def endpoint(self, spec):
        return _MpQueueEnd(spec, bounded=spec.size >= (1 << 20))


class _SimpleQueueEnd(SharedEndpoint):
    def __init__(self, spec):
        super().__init__(spec)
        self.q = CTX.SimpleQueue()

    def sender(self, k):
        t = Tx()
        t.send = self.q.put
        t.finish = lambda: self.finish(self.q.put)
        return t

    def receiver(self, j):
        r = Rx()
        r.recv = self.q.get
        return r

    def destroy(self):
        self.q.close()


class SimpleQueuePeer(Peer):
    key = "mp.SimpleQueue"
    name = "mp.SimpleQueue"

    def endpoint(self, spec):
        return _SimpleQueueEnd(spec)


class _PipeEnd(Endpoint):
    def __init__(self, spec):
        super().__init__(spec)
        self.r, self.w = CTX.Pipe(duplex=False)

    def sender(self, k):
        t = Tx()
        t.send = self.w.send if self.spec.objects else self.w.send_bytes
        return t

    def receiver(self, j):
        r = Rx()
        r.recv = self.r.recv if self.spec.objects else self.r.recv_bytes
        return r

    def destroy(self):
        self.r.close()
        self.w.close()


class PipePeer(Peer):
    key = "mp.Pipe"
    name = "mp.Pipe"
    mpmc = False
    note = "send_bytes/recv_bytes for bytes, send/recv (pickle) for objects"

    def endpoint(self, spec):
        return _PipeEnd(spec)


# --------------------------------------------------------------------------
# faster-fifo

class _FasterFifoEnd(SharedEndpoint):
    def __init__(self, spec):
        super().__init__(spec)
        import faster_fifo
        per = 256 if spec.objects else spec.size + 64
        size = max(1 << 20, spec.cap * per + 4096)
        if spec.objects:
            self.q = faster_fifo.Queue(max_size_bytes=size)
        else:
            # Raw bytes, no pickling: the same work shm's codec="bytes" does.
            self.q = faster_fifo.Queue(max_size_bytes=size, loads=bytes, dumps=_ident)

    def sender(self, k):
        t = Tx()
        q = self.q
        t.send = q.put
        t.send_many = q.put_many
        t.finish = lambda: self.finish(q.put)
        return t

    def receiver(self, j):
        r = Rx()
        r.recv = self.q.get
        r.recv_many = functools.partial(self.q.get_many, max_messages_to_get=BATCH)
        return r

    def destroy(self):
        self.q.close()


class FasterFifoPeer(Peer):
    key = "faster-fifo"
    name = "faster-fifo"
    batched = True
    note = "raw bytes (loads=bytes, dumps=identity) for bytes; pickle for objects"

    def check(self):
        try:
            import faster_fifo  # noqa: F401
        except Exception as e:
            raise Unavailable(f"import faster_fifo: {e}") from None

    def endpoint(self, spec):
        return _FasterFifoEnd(spec)


# --------------------------------------------------------------------------
# pyzmq

class _ZmqEnd(Endpoint):
    def __init__(self, spec):
        super().__init__(spec)
        self.dir = tempfile.mkdtemp(prefix="shmbench-zmq-")
        self.addrs = [f"ipc://{self.dir}/c{j}" for j in range(spec.consumers)]
        self.bound = [CTX.Event() for _ in range(spec.consumers)]
        self.stops_needed = spec.producers

    def sender(self, k):
        import zmq
        ctx = zmq.Context()
        socks = []
        for a in self.addrs:
            s = ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(a)
            socks.append(s)
        big = self.spec.size >= (64 << 10) and not self.spec.objects

        def one(s):
            if self.spec.objects:
                return s.send_pyobj
            return functools.partial(s.send, copy=False) if big else s.send

        sends = [one(s) for s in socks]
        t = Tx()
        if len(sends) == 1:
            t.send = sends[0]
        else:
            nxt = itertools.cycle(sends).__next__
            t.send = lambda m: nxt()(m)

        def finish():
            if self.spec.consumers > 1 or self.spec.producers > 1:
                for s in socks:
                    s.send(SENTINEL)

        def settle():
            for e in self.bound:
                if not e.wait(60):
                    raise RunError("pyzmq: a receiver never bound")

        def close():
            for s in socks:
                s.close(0)
            ctx.term()

        t.finish, t.settle, t.close = finish, settle, close
        return t

    def receiver(self, j):
        import zmq
        ctx = zmq.Context()
        s = ctx.socket(zmq.PULL)
        s.setsockopt(zmq.LINGER, 0)
        s.bind(self.addrs[j])
        self.bound[j].set()
        r = Rx()
        r.recv = s.recv_pyobj if self.spec.objects else s.recv

        def close():
            s.close(0)
            ctx.term()

        r.close = close
        return r

    def destroy(self):
        shutil.rmtree(self.dir, ignore_errors=True)


class ZmqPeer(Peer):
    key = "pyzmq"
    name = "pyzmq PUSH/PULL ipc"
    note = "send/recv (copy=False on send from 64 KiB); send_pyobj/recv_pyobj (pickle) for objects"

    def check(self):
        try:
            import zmq  # noqa: F401
        except Exception as e:
            raise Unavailable(f"import zmq: {e}") from None

    def endpoint(self, spec):
        return _ZmqEnd(spec)


# --------------------------------------------------------------------------
# iceoryx2

IOX_PREFIX = f"shmbench_iox2_{os.getpid()}_"          # every file iceoryx2 makes for us
IOX_ROOT = f"/tmp/shmbench_iox2_{os.getpid()}/"
_iox_seq = itertools.count()


def _iox_node():
    import iceoryx2 as iox2
    iox2.set_log_level(iox2.LogLevel.Error)
    cfg = iox2.config.default()
    cfg.global_cfg.prefix = iox2.FileName.new(IOX_PREFIX)
    cfg.global_cfg.root_path = iox2.Path.new(IOX_ROOT)
    return iox2, iox2.NodeBuilder.new().config(cfg).create(iox2.ServiceType.Ipc)


class _IoxEnd(Endpoint):
    shm_prefixes = (IOX_PREFIX,)

    def __init__(self, spec, zero_copy):
        super().__init__(spec)
        if spec.consumers > 1 or spec.producers > 1:
            raise Unavailable("publish-subscribe fans out to every subscriber: no competing consumers")
        self.zero_copy = zero_copy
        self.service = f"shmbench/{os.getpid()}/{next(_iox_seq)}"
        self.pub_made = CTX.Event()
        self.sub_ready = CTX.Event()

    def _service(self, iox2, node):
        cap = self.spec.cap
        return (node.service_builder(iox2.ServiceName.new(self.service))
                .publish_subscribe(iox2.Slice[ctypes.c_uint8])
                .subscriber_max_buffer_size(cap).history_size(0).enable_safe_overflow(False)
                .open_or_create())

    def sender(self, k):
        iox2, node = _iox_node()
        svc = self._service(iox2, node)
        b = svc.publisher_builder().backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
        if self.spec.objects:
            b = b.initial_max_slice_len(256).allocation_strategy(iox2.AllocationStrategy.PowerOfTwo)
        else:
            b = b.initial_max_slice_len(self.spec.size)
        pub = b.create()
        self.pub_made.set()
        loan, mm, objects = pub.loan_slice_uninit, ctypes.memmove, self.spec.objects
        dumps = pickle.dumps

        def send(m):
            if objects:
                m = dumps(m, 5)
            n = len(m)
            s = loan(n)
            mm(s.payload_ptr, m, n)
            if s.assume_init().send() == 0:
                raise RunError("iceoryx2: a sample reached no subscriber (dropped silently)")

        def settle():
            if not self.sub_ready.wait(60):
                raise RunError("iceoryx2: the subscriber never connected")
            pub.update_connections()

        def close():
            nonlocal pub, svc, node
            pub.delete()           # drop the port, then the node, so iceoryx2 removes its files
            pub = svc = node = None

        t = Tx()
        t.send, t.settle, t.close = send, settle, close
        return t

    def receiver(self, j):
        iox2, node = _iox_node()
        svc = self._service(iox2, node)
        sub = svc.subscriber_builder().buffer_size(self.spec.cap).create()
        rcv, sa, loads = sub.receive, ctypes.string_at, pickle.loads
        objects, zero_copy = self.spec.objects, self.zero_copy

        if zero_copy:
            def recv():
                while True:          # receive() never blocks: consumers busy-poll
                    s = rcv()
                    if s is not None:
                        n = s.header.number_of_elements
                        s.delete()
                        return n
        elif objects:
            def recv():
                while True:
                    s = rcv()
                    if s is not None:
                        b = sa(s.payload_ptr, s.header.number_of_elements)
                        s.delete()
                        return loads(b)
        else:
            def recv():
                while True:
                    s = rcv()
                    if s is not None:
                        b = sa(s.payload_ptr, s.header.number_of_elements)
                        s.delete()
                        return b

        def settle():
            if not self.pub_made.wait(60):
                raise RunError("iceoryx2: the publisher was never created")
            s = sub.receive()      # connects to the publisher's data segment
            if s is not None:
                raise RunError("iceoryx2: unexpected sample before the start")
            self.sub_ready.set()

        def close():
            nonlocal sub, svc, node
            sub.delete()
            sub = svc = node = None

        r = Rx()
        r.recv, r.settle, r.close = recv, settle, close
        return r

    def destroy(self):
        shutil.rmtree(IOX_ROOT, ignore_errors=True)


class IceoryxPeer(Peer):
    key = "iceoryx2"
    name = "iceoryx2 pub/sub"
    mpmc = False

    def __init__(self, zero_copy=False):
        self.zero_copy = zero_copy
        if zero_copy:
            self.key = "iceoryx2-zc"
            self.name = "iceoryx2, zero-copy read"
            self.note = ("consumer takes the sample and releases it without copying the payload "
                         "out: not like-for-like (every other consumer gets a bytes object)")
        else:
            self.note = ("loan + memmove + send; consumer busy-polls receive() and copies the payload "
                         "into bytes (what shm's recv returns)")

    def check(self):
        try:
            import iceoryx2  # noqa: F401
        except Exception as e:
            raise Unavailable(f"import iceoryx2: {e}") from None

    def endpoint(self, spec):
        return _IoxEnd(spec, self.zero_copy)
