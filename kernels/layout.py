"""Byte layouts of every shared segment, declared once.

Each structure is a ``Layout``: an ordered list of fields with a size and an
alignment, from which offsets are computed. Kernels use the module-level
integer constants below (numba freezes module globals at compile time);
``tests/test_layout.py`` checks every offset against the declarations, every
atomic word's 8-byte alignment and every hot word's own cache line. Nothing
else in the code base may hard-code an offset.

CACHE_LINE is 128, not 64: on x86-64 the spatial prefetcher pulls pairs of
64-byte lines, so two hot words 64 bytes apart still ping-pong between cores
(crossbeam's ``CachePadded`` makes the same choice, for the same reason; on
Apple M-series the line itself is 128 bytes). Only words written by different
parties at high rates get their own line (a ring's ``head`` and ``tail``, the
futex words); read-mostly words share lines.

Segments
--------
Every segment starts with ``SEGMENT`` (the common header, 256 bytes): magic,
layout version, kind, size, creator, a CRC over the immutable fields, and
kind-specific immutable parameters (``P0``..``P7``). What follows depends on
the kind:

* ``KIND_CHANNEL``: the channel control block (``CHANNEL``: futex words,
  waiter and role bitmaps, unbounded-channel generation counters), the
  participant table (``PARTICIPANT`` x ``MAX_PARTICIPANTS``), the token table
  (``TOKEN`` x ``MAX_TOKENS``), then ring generation 0 (``RING`` + slots).
* ``KIND_RING``: a later generation of an unbounded channel's ring.
* ``KIND_BLOB``: the out-of-band payload of one large message slot.
* ``KIND_DICT``/``KIND_SHARD``: a SharedDict's control segment and its shard generations.
* ``KIND_SYNC``: one synchronisation primitive (``SYNC``, then the participant
  table, the token table and one ``holds`` word per participant).
"""
from __future__ import annotations

from dataclasses import dataclass

CACHE_LINE = 128
WORD = 8

MAGIC = 0x31_4E_41_4C_50_4D_48_53   # b"SHMPLAN1" read as a little-endian int64
LAYOUT_VERSION = 1

KIND_CHANNEL = 1
KIND_RING = 2
KIND_BLOB = 3
KIND_DICT = 4
KIND_SHARD = 5
KIND_SYNC = 6
KIND_NAMES = {KIND_CHANNEL: "channel", KIND_RING: "ring", KIND_BLOB: "blob", KIND_DICT: "dict",
              KIND_SHARD: "dict shard", KIND_SYNC: "sync"}

MAX_PARTICIPANTS = 256          # one byte of owner index in a slot stamp
BITMAP_WORDS = MAX_PARTICIPANTS // 64
MAX_TOKENS = 64                 # one word of token bitmap per role


@dataclass(frozen=True)
class Field:
    name: str
    size: int
    align: int = WORD
    atomic: bool = False     # accessed with kernels.atomics
    hot: bool = False        # written often by several parties: owns its cache line


class Layout:
    """Offsets of ``fields`` laid out in order, each aligned as declared."""

    def __init__(self, name: str, fields: list[Field], align: int = WORD, size: int | None = None):
        self.name = name
        self.fields = {}
        self.offsets = {}
        off = 0
        for f in fields:
            a = CACHE_LINE if f.hot else f.align
            off = _round_up(off, a)
            self.fields[f.name] = f
            self.offsets[f.name] = off
            off += CACHE_LINE if f.hot else f.size
        self.align = align
        natural = _round_up(off, align)
        if size is not None:
            if size < natural:
                raise ValueError(f"{name}: declared size {size} < natural size {natural}")
            natural = size
        self.size = natural

    def __getitem__(self, name: str) -> int:
        return self.offsets[name]

    def __repr__(self):
        rows = ", ".join(f"{k}@{v}" for k, v in self.offsets.items())
        return f"Layout({self.name}, size={self.size}: {rows})"


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


# --------------------------------------------------------------------------
# The common segment header.

SEGMENT = Layout("segment", [
    Field("magic", 8),
    Field("version", 8),
    Field("kind", 8),
    Field("size", 8),             # bytes of the segment as created
    Field("creator_pid", 8),
    Field("creator_start", 8),    # creator's start time, clock ticks since boot
    Field("created_ns", 8),       # time.time_ns() at creation
    Field("params", 8 * 8),       # P0..P7, kind-specific, immutable
    Field("family", 16, 1),       # ascii prefix of derived segment names
    Field("name", 64, 1),         # ascii public name
    Field("crc", 8),              # crc32 of bytes [0, crc)
    Field("state", 8, atomic=True),   # SEG_OPEN / SEG_UNLINKED: mutable, after the CRC
], size=256)

SEG_MAGIC = SEGMENT["magic"]
SEG_VERSION = SEGMENT["version"]
SEG_KIND = SEGMENT["kind"]
SEG_SIZE = SEGMENT["size"]
SEG_CREATOR_PID = SEGMENT["creator_pid"]
SEG_CREATOR_START = SEGMENT["creator_start"]
SEG_CREATED_NS = SEGMENT["created_ns"]
SEG_PARAMS = SEGMENT["params"]
SEG_FAMILY = SEGMENT["family"]
SEG_NAME = SEGMENT["name"]
SEG_CRC = SEGMENT["crc"]
SEG_STATE = SEGMENT["state"]
SEG_HEADER = SEGMENT.size
FAMILY_LEN = SEGMENT.fields["family"].size
NAME_LEN = SEGMENT.fields["name"].size

SEG_INIT = 0          # being initialised by its creator
SEG_OPEN = 1
SEG_UNLINKED = 2      # the last participant left; the name is gone or going
SEG_CLOSING = 3       # a participant that believes it is the last is checking (pid << 8 | 3)
SEG_STATE_MASK = 0xFF

# Channel parameters (SEGMENT params P0..P7 of a KIND_CHANNEL segment).
P_FLAVOR = 0          # FLAVOR_*
P_CAPACITY = 1        # user-visible capacity (0 for rendezvous; gen-0 size for unbounded)
P_SLOT = 2            # slot size in bytes
P_CODEC = 3           # codec id (shm/codec.py)
P_RING = 4            # byte offset of ring generation 0
P_RING_CAP = 5        # slots in ring generation 0
P_PARTICIPANTS = 6    # byte offset of the participant table
P_TOKENS = 7          # byte offset of the token table

FLAVOR_BOUNDED = 1
FLAVOR_UNBOUNDED = 2
FLAVOR_RENDEZVOUS = 3

# Ring parameters (P0..P7 of a KIND_RING segment).
PR_GEN = 0
PR_CAP = 1
PR_SLOT = 2
PR_BASE = 3           # global position of the ring's first slot
PR_RING = 4           # byte offset of the ring header

# Blob parameters (P0..P3 of a KIND_BLOB segment).
PB_GEN = 0            # ring generation
PB_ENTRY = 1          # blob pool entry index
PB_BLOBGEN = 2        # the entry's blob generation
PB_CAPACITY = 3       # payload bytes available after the header
BLOB_DATA = SEG_HEADER

# --------------------------------------------------------------------------
# The channel control block, right after the segment header.

CHANNEL = Layout("channel", [
    # Receivers park on rx_seq; a sender that publishes while any bit of
    # rx_waiters is set bumps rx_seq and wakes. Senders waiting for space use
    # tx_seq/tx_waiters the same way. A bit per participant (not a count) so
    # a participant that dies while parked can be cleared idempotently.
    Field("rx_seq", 8, atomic=True, hot=True),
    Field("rx_waiters", 8 * BITMAP_WORDS, atomic=True, hot=True),
    Field("tx_seq", 8, atomic=True, hot=True),
    Field("tx_waiters", 8 * BITMAP_WORDS, atomic=True, hot=True),
    # Read on every send/recv, written when handles open and close: one line.
    Field("tx_roles", 8 * BITMAP_WORDS, atomic=True, align=CACHE_LINE),
    Field("rx_roles", 8 * BITMAP_WORDS, atomic=True),
    Field("tx_tokens", 8, atomic=True),
    Field("rx_tokens", 8, atomic=True),
    # Unbounded channels: which ring generation producers push to / consumers pop from.
    Field("tail_gen", 8, atomic=True, hot=True),
    Field("head_gen", 8, atomic=True, hot=True),
    # Who is creating the next generation: next_gen << 16 | (participant + 1), or 0.
    Field("grow", 8, atomic=True),
    # JoinableQueue: unfinished tasks (put minus task_done); join() sleeps on it.
    Field("tasks", 8, atomic=True, hot=True),
    Field("blob_bytes", 8, atomic=True, align=CACHE_LINE),   # bytes held in blob segments
    Field("blob_segments", 8, atomic=True),
    Field("tombstones", 8, atomic=True),    # slots recovered from dead producers
    Field("dropped", 8, atomic=True),       # messages lost with dead consumers
    Field("reaped", 8, atomic=True),        # dead participants reaped
    # bounded(reserve=N): bytes of each first-generation pool entry's blob made at
    # creation; written once before the segment is OPEN, read-only after.
    Field("blob_reserve", 8),
], align=CACHE_LINE)

CH_BASE = SEG_HEADER
CH_RX_SEQ = CH_BASE + CHANNEL["rx_seq"]
CH_RX_WAITERS = CH_BASE + CHANNEL["rx_waiters"]
CH_TX_SEQ = CH_BASE + CHANNEL["tx_seq"]
CH_TX_WAITERS = CH_BASE + CHANNEL["tx_waiters"]
CH_TX_ROLES = CH_BASE + CHANNEL["tx_roles"]
CH_RX_ROLES = CH_BASE + CHANNEL["rx_roles"]
CH_TX_TOKENS = CH_BASE + CHANNEL["tx_tokens"]
CH_RX_TOKENS = CH_BASE + CHANNEL["rx_tokens"]
CH_TAIL_GEN = CH_BASE + CHANNEL["tail_gen"]
CH_HEAD_GEN = CH_BASE + CHANNEL["head_gen"]
CH_GROW = CH_BASE + CHANNEL["grow"]
CH_TASKS = CH_BASE + CHANNEL["tasks"]
CH_BLOB_BYTES = CH_BASE + CHANNEL["blob_bytes"]
CH_BLOB_SEGMENTS = CH_BASE + CHANNEL["blob_segments"]
CH_TOMBSTONES = CH_BASE + CHANNEL["tombstones"]
CH_DROPPED = CH_BASE + CHANNEL["dropped"]
CH_REAPED = CH_BASE + CHANNEL["reaped"]
CH_BLOB_RESERVE = CH_BASE + CHANNEL["blob_reserve"]
CH_END = CH_BASE + CHANNEL.size

# Roles, as indices into the role and waiter bitmaps.
ROLE_TX = 0
ROLE_RX = 1

# --------------------------------------------------------------------------
# Participants: one entry per attached process.

PARTICIPANT = Layout("participant", [
    # state = (incarnation << 40) | (pid << 8) | code; code is one of PS_*.
    # CAS-ed as a whole, so a reaper and a new claimant cannot both win, and
    # the incarnation defeats ABA when an entry is freed and claimed again.
    Field("state", 8, atomic=True),
    Field("pid", 8),
    Field("start", 8),          # start time (clock ticks since boot) from /proc/PID/stat
    Field("pidns", 8),          # inode of /proc/PID/ns/pid: pids compare only within one namespace
    Field("roles", 8, atomic=True),   # informational: bit ROLE_TX, bit ROLE_RX
    # Operations done through this entry (dicts: get, put, delete, incr), for
    # `python -m shm top`. Written only by the entry's owner (relaxed stores);
    # never reset, so the sum over all entries only grows as occupants change.
    Field("ops", 8, atomic=True),
], size=64)

PT_STATE = PARTICIPANT["state"]
PT_PID = PARTICIPANT["pid"]
PT_START = PARTICIPANT["start"]
PT_PIDNS = PARTICIPANT["pidns"]
PT_ROLES = PARTICIPANT["roles"]
PT_OPS = PARTICIPANT["ops"]
PT_SIZE = PARTICIPANT.size

PS_FREE = 0
PS_CLAIMING = 1     # claimed by `pid`; pid/start/pidns being written
PS_ALIVE = 2
PS_REAPING = 3      # its process is dead; a reaper (whose pid replaces it in the state) recovers what it held
PS_CODE_MASK = 0xFF
PS_PID_SHIFT = 8
PS_PID_MASK = (1 << 32) - 1
PS_INC_SHIFT = 40

# --------------------------------------------------------------------------
# Tokens: a handle that was pickled (or inherited across fork) and not yet
# claimed by the process that unpickles it still counts as a sender or
# receiver while the process that lent it is alive, so a parent that closes
# its own handle right after starting a child does not disconnect (or
# unlink) the channel before the child attaches.

TOKEN = Layout("token", [
    # state = 0 (free), or role, kind and serial (see shm/_registry.py)
    Field("state", 8, atomic=True),
    Field("created_ns", 8),       # CLOCK_MONOTONIC at lending
    Field("lender_pid", 8),
    Field("lender_start", 8),
], size=32)

TK_STATE = TOKEN["state"]
TK_CREATED = TOKEN["created_ns"]
TK_LENDER_PID = TOKEN["lender_pid"]
TK_LENDER_START = TOKEN["lender_start"]
TK_SIZE = TOKEN.size
TOKEN_PICKLE = 1
TOKEN_FORK = 2

# --------------------------------------------------------------------------
# The ring: Vyukov's bounded MPMC queue with owner-tagged stamps (kernels/ring.py).

RING = Layout("ring", [
    Field("tail", 8, atomic=True, hot=True),   # next position to claim for a push; bit SEALED_BIT seals
    Field("head", 8, atomic=True, hot=True),   # next position to claim for a pop
    Field("cap", 8, align=CACHE_LINE),         # slots (immutable)
    Field("slot", 8),                           # slot size in bytes (immutable)
    Field("base", 8),                           # position of this generation's first message
    Field("gen", 8),
    # The blob pool entry freed last (consumers store it, producers try it
    # first): a steady stream of large messages reuses one hot blob.
    Field("blob_hint", 8, atomic=True, align=CACHE_LINE),
], align=CACHE_LINE)

RG_TAIL = RING["tail"]
RG_HEAD = RING["head"]
RG_CAP = RING["cap"]
RG_SLOT = RING["slot"]
RG_BASE = RING["base"]
RG_GEN = RING["gen"]
RG_BLOB_HINT = RING["blob_hint"]
RING_HEADER = RING.size

SLOT = Layout("slot", [
    Field("stamp", 8, atomic=True),  # (pos << 10) | (owner << 2) | state: see kernels/ring.py
    Field("meta", 8),                # len (bits 0..47) | kind << 48 | flags << 56
    Field("blob", 8),                # the blob pool entry this slot's producer takes (or tries to)
    Field("pad", 8),
])
SL_STAMP = SLOT["stamp"]
SL_META = SLOT["meta"]
SL_BLOB = SLOT["blob"]
SL_PAD = SLOT["pad"]
SLOT_HEADER = SLOT.size       # 32: the inline payload starts here
MIN_SLOT = 64
SLOT_ALIGN = 64

META_LEN_MASK = (1 << 48) - 1
META_KIND_SHIFT = 48
META_FLAGS_SHIFT = 56
FLAG_BLOB = 1      # payload is in the blob of the pool entry the slot names
BLOB_MIN_LG = 12   # smallest blob: a page (a 1 KiB message must not cost 64 KiB)
FLAG_TOMB = 2      # no message: a recovered claim of a dead producer


# The blob pool of a ring: one entry per slot, right after the slots
# (kernels/ring.py, "Blob pool"). Entry e owns the blob segment F r<gen>p<e>g<bgen>.
BLOB_ENTRY = Layout("blob_entry", [
    Field("state", 8, atomic=True),  # 0: free; p + 1: taken for the message of position p
    Field("info", 8),                # bgen << 8 | log2(capacity); low byte 0: no blob now
])
BE_STATE = BLOB_ENTRY["state"]
BE_INFO = BLOB_ENTRY["info"]
BE_SIZE = BLOB_ENTRY.size


def ring_bytes(ring_cap: int, slot: int) -> int:
    """Bytes from a ring header to the end of its blob pool."""
    return RING_HEADER + ring_cap * (slot + BE_SIZE)


def channel_layout(ring_cap: int, slot: int) -> dict:
    """Offsets and total size of a channel control segment."""
    participants = _round_up(CH_END, CACHE_LINE)
    tokens = participants + MAX_PARTICIPANTS * PT_SIZE
    ring = _round_up(tokens + MAX_TOKENS * TK_SIZE, CACHE_LINE)
    return {"participants": participants, "tokens": tokens, "ring": ring,
            "pool": ring + RING_HEADER + ring_cap * slot, "size": ring + ring_bytes(ring_cap, slot)}


def ring_layout(ring_cap: int, slot: int) -> dict:
    """Offsets and total size of a ring-generation segment."""
    ring = _round_up(SEG_HEADER, CACHE_LINE)
    return {"ring": ring, "pool": ring + RING_HEADER + ring_cap * slot, "size": ring + ring_bytes(ring_cap, slot)}


# --------------------------------------------------------------------------
# The shared dict (kernels/hashtable.py, shm/dict.py).
#
# A KIND_DICT control segment: header; the control block (``DICT``); the
# participant and token tables; the shard table (``SHARD_ENTRY`` per shard:
# its robust lock and its current generation); the announce table (one
# line per participant: which shard generation it is incrementing in
# lock-free right now). Each shard's data is a KIND_SHARD segment per
# generation: ``SHARD`` header, the index (``nslots`` one-word entries),
# then the record heap.

# Dict parameters (P0..P7 of a KIND_DICT segment).
PD_SHARDS = 0         # number of shards (a power of two)
PD_CODEC = 1
PD_KEY_TYPE = 2       # 0 any, 1 int64 (numeric mode)
PD_VALUE_TYPE = 3     # 0 any, 1 int64, 2 float64 (numeric mode)
PD_PARTICIPANTS = 4
PD_TOKENS = 5
PD_TABLE = 6          # byte offset of the shard table
PD_ANNOUNCE = 7       # byte offset of the announce table

DICT = Layout("dict", [
    Field("roles", 8 * BITMAP_WORDS, atomic=True),      # participants with the dict open
    Field("roles2", 8 * BITMAP_WORDS, atomic=True),     # (unused: the registry's second role)
    Field("tokens", 8, atomic=True),
    Field("tokens2", 8, atomic=True),
    Field("waiters", 8 * BITMAP_WORDS, atomic=True),
    Field("waiters2", 8 * BITMAP_WORDS, atomic=True),
    Field("growths", 8, atomic=True, align=CACHE_LINE),  # shard generations made (growth, compaction)
    Field("repairs", 8, atomic=True),                    # shards recovered from a dead lock holder
    Field("reaped", 8, atomic=True),
], align=CACHE_LINE)

DC_BASE = SEG_HEADER
DC_ROLES = DC_BASE + DICT["roles"]
DC_ROLES2 = DC_BASE + DICT["roles2"]
DC_TOKENS = DC_BASE + DICT["tokens"]
DC_TOKENS2 = DC_BASE + DICT["tokens2"]
DC_WAITERS = DC_BASE + DICT["waiters"]
DC_WAITERS2 = DC_BASE + DICT["waiters2"]
DC_GROWTHS = DC_BASE + DICT["growths"]
DC_REPAIRS = DC_BASE + DICT["repairs"]
DC_REAPED = DC_BASE + DICT["reaped"]
DC_END = DC_BASE + DICT.size

SHARD_ENTRY = Layout("shard_entry", [
    # lock = 0 when free, else (owner participant + 1) | LOCK_WAITERS when a
    # waiter is parked on the word (a futex).
    Field("lock", 8, atomic=True),
    Field("gen", 8, atomic=True),          # current generation of the shard's segment
    Field("lock_waits", 8, atomic=True),   # acquisitions that had to wait
    Field("growths", 8, atomic=True),
    # Bits 0-47 count finished writes to the shard (every unlock, every
    # lock-free increment); bits 48-62 count lock-free increments in flight.
    # A process may serve a value it read at version v while the word still
    # reads v and the lock is free (shm/dict.py's read cache).
    Field("version", 8, atomic=True),
], size=CACHE_LINE)
SE_LOCK = SHARD_ENTRY["lock"]
SE_VERSION = SHARD_ENTRY["version"]
VERSION_BUSY = 1 << 48          # one lock-free increment in flight
VERSION_MASK = VERSION_BUSY - 1
SE_GEN = SHARD_ENTRY["gen"]
SE_LOCK_WAITS = SHARD_ENTRY["lock_waits"]
SE_GROWTHS = SHARD_ENTRY["growths"]
SE_SIZE = SHARD_ENTRY.size
LOCK_WAITERS = 1 << 16
LOCK_OWNER_MASK = 0xFFFF

ANNOUNCE_SIZE = 64     # one line per participant: (shard + 1) << 32 | generation, 0 when idle

# Shard generation parameters (P0..P7 of a KIND_SHARD segment).
PS_SHARD = 0
PS_GEN = 1
PS_NSLOTS = 2          # index entries (a power of two)
PS_INDEX = 3           # byte offset of the index
PS_HEAP = 4            # byte offset of the heap
PS_HEAP_SIZE = 5       # heap bytes

SHARD = Layout("shard", [
    # 0 live; 1 being compacted (lock-free incr must go through the lock);
    # 2 replaced by a newer generation (readers move to it).
    Field("state", 8, atomic=True, hot=True),
    Field("bump", 8, atomic=True, align=CACHE_LINE),   # heap bytes allocated (records are never moved)
    Field("count", 8, atomic=True),                    # live keys
    Field("tombs", 8, atomic=True),                    # tombstones in the index
    Field("garbage", 8, atomic=True),                  # heap bytes of replaced or deleted records
], align=CACHE_LINE)
SH_BASE = _round_up(SEG_HEADER, CACHE_LINE)      # the shard header follows the segment header
SH_STATE = SH_BASE + SHARD["state"]
SH_BUMP = SH_BASE + SHARD["bump"]
SH_COUNT = SH_BASE + SHARD["count"]
SH_TOMBS = SH_BASE + SHARD["tombs"]
SH_GARBAGE = SH_BASE + SHARD["garbage"]
SH_END = SH_BASE + SHARD.size
SHARD_LIVE = 0
SHARD_COMPACTING = 1
SHARD_REPLACED = 2

RECORD = Layout("record", [
    Field("hash", 8),
    Field("info", 8),      # key length (bits 0-31) | value kind << 32
    Field("value", 8),     # an int64/float64 value in place, or the value's length
])
RC_HASH = RECORD["hash"]
RC_INFO = RECORD["info"]
RC_VALUE = RECORD["value"]
RECORD_HEADER = RECORD.size       # key bytes follow, then value bytes, padded to 8

# Index entries: EMPTY, TOMB, or (record offset / 8) << ENTRY_SHIFT | tag.
ENTRY_EMPTY = 0
ENTRY_TOMB = 1
ENTRY_SHIFT = 20
ENTRY_TAG_MASK = (1 << ENTRY_SHIFT) - 1

# Value kinds stored with a record (codec kinds 0-3 for encoded values).
VK_I64 = 0x81          # an int64 in the record's value word: incr works lock-free
VK_F64 = 0x82          # a float64 in the record's value word
VK_STR = 0x83          # a str as UTF-8, without the codec (str values are the commonest; msgpack's
                       # packb/unpackb cost ~200/100 ns where encode/decode cost ~30)


def dict_layout(nshards: int) -> dict:
    participants = _round_up(DC_END, CACHE_LINE)
    tokens = participants + MAX_PARTICIPANTS * PT_SIZE
    table = _round_up(tokens + MAX_TOKENS * TK_SIZE, CACHE_LINE)
    announce = table + nshards * SE_SIZE
    size = announce + MAX_PARTICIPANTS * ANNOUNCE_SIZE
    return {"participants": participants, "tokens": tokens, "table": table, "announce": announce,
            "size": size}


def shard_layout(nslots: int, heap: int) -> dict:
    index = SH_END
    heap_off = _round_up(index + 8 * nslots, 64)
    return {"header": SH_BASE, "index": index, "heap": heap_off, "size": heap_off + _round_up(heap, 8)}


# --------------------------------------------------------------------------
# Synchronisation primitives (kernels/sync.py, shm/sync.py): one KIND_SYNC
# segment per primitive: header; ``SYNC``; the participant and token
# tables; ``holds`` (one word per participant: what it holds, to give back
# when it dies: permits, read locks, WaitGroup units, Notify waits).

# Sync parameters (P0..P7 of a KIND_SYNC segment).
PY_TYPE = 0           # SYNC_* below
PY_ARG = 1            # Semaphore: initial value; Barrier: parties
PY_ARG2 = 2           # BoundedSemaphore: the bound (0: unbounded)
PY_FLAGS = 3          # SYNCF_*
PY_PARTICIPANTS = 4
PY_TOKENS = 5
PY_HOLDS = 6          # byte offset of the holds table
PY_HOLD_STRIDE = 7    # bytes between two participants' holds words (RWLock: a cache line each)

SYNC_ATOMIC_INT = 1
SYNC_ATOMIC_FLOAT = 2
SYNC_LOCK = 3
SYNC_RLOCK = 4
SYNC_SEMAPHORE = 5
SYNC_EVENT = 6
SYNC_CONDITION = 7
SYNC_BARRIER = 8
SYNC_WAITGROUP = 9
SYNC_NOTIFY = 10
SYNC_RWLOCK = 11
SYNCF_RETURN_ON_DEATH = 1     # Semaphore: a dead process's permits are given back

SYNC = Layout("sync", [
    # The primitive's state: the atomic's value, the lock word (owner + 1 in
    # bits 0-15, 0xFFFF = free but orphaned by a dead owner), a semaphore's
    # permits, an event's flag, a barrier's generation << 32 | arrived, a
    # WaitGroup's count, Notify's state (kernels/sync.py has each encoding).
    Field("value", 8, atomic=True, hot=True),
    # The futex word waiters park on; bumped by whoever changes ``value`` in
    # a way a waiter waits for, only when ``waiters`` has a bit set.
    Field("seq", 8, atomic=True, hot=True),
    Field("aux", 8, atomic=True, align=CACHE_LINE),   # Condition/Notify: second counter; Barrier: reset generation
    Field("flag", 8, atomic=True),                    # Barrier: broken
    Field("waiters", 8 * BITMAP_WORDS, atomic=True),  # participants parked (or about to) on seq
    Field("waiters2", 8 * BITMAP_WORDS, atomic=True), # (the registry's second side: unused)
    Field("roles", 8 * BITMAP_WORDS, atomic=True),    # participants with the primitive open
    Field("roles2", 8 * BITMAP_WORDS, atomic=True),   # (unused)
    Field("tokens", 8, atomic=True),
    Field("tokens2", 8, atomic=True),
    Field("reaped", 8, atomic=True),                  # dead participants reaped
    Field("recovered", 8, atomic=True),               # locks orphaned by a dead owner, permits given back
], align=CACHE_LINE)

SY_BASE = SEG_HEADER
SY_VALUE = SY_BASE + SYNC["value"]
SY_SEQ = SY_BASE + SYNC["seq"]
SY_AUX = SY_BASE + SYNC["aux"]
SY_FLAG = SY_BASE + SYNC["flag"]
SY_WAITERS = SY_BASE + SYNC["waiters"]
SY_WAITERS2 = SY_BASE + SYNC["waiters2"]
SY_ROLES = SY_BASE + SYNC["roles"]
SY_ROLES2 = SY_BASE + SYNC["roles2"]
SY_TOKENS = SY_BASE + SYNC["tokens"]
SY_TOKENS2 = SY_BASE + SYNC["tokens2"]
SY_REAPED = SY_BASE + SYNC["reaped"]
SY_RECOVERED = SY_BASE + SYNC["recovered"]
SY_END = SY_BASE + SYNC.size


def sync_layout(hold_stride: int = WORD) -> dict:
    """Offsets and total size of a KIND_SYNC segment whose holds words are ``hold_stride`` bytes apart.

    An RWLock's readers each count their read locks in their own holds word,
    so its stride is CACHE_LINE: readers in different processes never share
    a line (crossbeam's ShardedLock, one shard per participant).
    """
    if hold_stride not in (WORD, CACHE_LINE):
        raise ValueError(f"hold_stride must be {WORD} or {CACHE_LINE}")
    participants = _round_up(SY_END, CACHE_LINE)
    tokens = participants + MAX_PARTICIPANTS * PT_SIZE
    holds = _round_up(tokens + MAX_TOKENS * TK_SIZE, CACHE_LINE)
    size = holds + MAX_PARTICIPANTS * hold_stride
    return {"participants": participants, "tokens": tokens, "holds": holds, "size": size,
            "hold_stride": hold_stride}


# --------------------------------------------------------------------------
# Broadcast and watch channels (kernels/broadcast.py, shm/broadcast.py): one
# KIND_BROADCAST segment: header; ``BROADCAST``; the participant and token
# tables; ``capacity`` slots of ``slot`` bytes (``BSLOT`` then the payload).

KIND_BROADCAST = 7
KIND_NAMES[KIND_BROADCAST] = "broadcast"

# Broadcast parameters (P0..P7 of a KIND_BROADCAST segment).
PC_CAPACITY = 0       # slots (a power of two)
PC_SLOT = 1           # bytes per slot, header included
PC_CODEC = 2
PC_WATCH = 3          # 1: a watch (readers read the latest value only)
PC_PARTICIPANTS = 4
PC_TOKENS = 5
PC_SLOTS = 6          # byte offset of slot 0

BROADCAST = Layout("broadcast", [
    # Positions below ``tail`` are published; only the lock holder stores it.
    Field("tail", 8, atomic=True, hot=True),
    # Subscribers park on ``seq``; a publisher that sees a bit of ``waiters``
    # set after publishing bumps it and wakes them all.
    Field("seq", 8, atomic=True, hot=True),
    Field("waiters", 8 * BITMAP_WORDS, atomic=True),
    # The publishers' lock: owner participant + 1, or 0. A dead owner's lock
    # is taken over (shm/broadcast.py); its half-written slot is below no
    # published position, so the next publisher simply writes it again.
    Field("lock", 8, atomic=True, align=CACHE_LINE),
    Field("waiters2", 8 * BITMAP_WORDS, atomic=True),     # (the registry's second side: unused)
    Field("tx_roles", 8 * BITMAP_WORDS, atomic=True, align=CACHE_LINE),
    Field("rx_roles", 8 * BITMAP_WORDS, atomic=True),
    Field("tx_tokens", 8, atomic=True),
    Field("rx_tokens", 8, atomic=True),
    Field("reaped", 8, atomic=True),
    Field("recovered", 8, atomic=True),                   # publisher locks taken over from dead owners
], align=CACHE_LINE)

BC_BASE = SEG_HEADER
BC_TAIL = BC_BASE + BROADCAST["tail"]
BC_SEQ = BC_BASE + BROADCAST["seq"]
BC_WAITERS = BC_BASE + BROADCAST["waiters"]
BC_LOCK = BC_BASE + BROADCAST["lock"]
BC_WAITERS2 = BC_BASE + BROADCAST["waiters2"]
BC_TX_ROLES = BC_BASE + BROADCAST["tx_roles"]
BC_RX_ROLES = BC_BASE + BROADCAST["rx_roles"]
BC_TX_TOKENS = BC_BASE + BROADCAST["tx_tokens"]
BC_RX_TOKENS = BC_BASE + BROADCAST["rx_tokens"]
BC_REAPED = BC_BASE + BROADCAST["reaped"]
BC_RECOVERED = BC_BASE + BROADCAST["recovered"]
BC_END = BC_BASE + BROADCAST.size

BSLOT = Layout("bslot", [
    # pos + 1 once the message at ``pos`` is complete; -(pos + 1) while it is
    # being written (a seqlock: readers check it before and after copying).
    Field("stamp", 8, atomic=True),
    Field("len", 8, atomic=True),
    Field("kind", 8, atomic=True),
], size=32)
BS_STAMP = BSLOT["stamp"]
BS_LEN = BSLOT["len"]
BS_KIND = BSLOT["kind"]
BS_DATA = BSLOT.size


def broadcast_layout(capacity: int, slot: int) -> dict:
    """Offsets and total size of a KIND_BROADCAST segment."""
    participants = _round_up(BC_END, CACHE_LINE)
    tokens = participants + MAX_PARTICIPANTS * PT_SIZE
    slots = _round_up(tokens + MAX_TOKENS * TK_SIZE, CACHE_LINE)
    return {"participants": participants, "tokens": tokens, "slots": slots, "size": slots + capacity * slot}


# --------------------------------------------------------------------------
# The process pool (kernels/pool.py, shm/pool.py): one KIND_POOL segment:
# header; ``POOL``; ``WORKER`` x workers; the injector deque (owned by the
# pool's parent); one deque per worker; the arena of task payloads.

KIND_POOL = 8
KIND_NAMES[KIND_POOL] = "pool"

# Pool parameters (P0..P7 of a KIND_POOL segment).
PP_WORKERS = 0        # worker slots
PP_DCAP = 1           # tasks per worker deque (a power of two)
PP_ICAP = 2           # tasks in the injector deque (a power of two)
PP_TABLE = 3          # byte offset of the worker table
PP_INJECTOR = 4       # byte offset of the injector deque
PP_DEQUES = 5         # byte offset of worker 0's deque (the others follow, dq_bytes apart)
PP_ARENA = 6          # byte offset of the payload arena
PP_ARENA_SIZE = 7     # arena bytes

POOL = Layout("pool", [
    # Bumped (seq_cst) by a worker each time it turns BUSY, before it claims
    # anything: the parent's quiescence scan reads it before and after.
    Field("epoch", 8, atomic=True, hot=True),
    # The futex word idle workers park on; bumped by whoever makes work
    # visible (the parent pushing, a worker that stole a batch) when a bit
    # of ``sleepers`` is set.
    Field("wake", 8, atomic=True, hot=True),
    # One bit per worker slot parked (or about to park) on ``wake``: a bit,
    # not a count, so the parent can clear a worker that died parked.
    Field("sleepers", 8 * BITMAP_WORDS, atomic=True, hot=True),
    Field("shutdown", 8, atomic=True, align=CACHE_LINE),   # POOL_RUN / POOL_STOP
    Field("pushed", 8, atomic=True),                       # tasks the parent has pushed (ever)
    Field("replaced", 8, atomic=True),                     # workers replaced after dying
], align=CACHE_LINE)

PO_EPOCH = SEG_HEADER + POOL["epoch"]
PO_WAKE = SEG_HEADER + POOL["wake"]
PO_SLEEPERS = SEG_HEADER + POOL["sleepers"]
PO_SHUTDOWN = SEG_HEADER + POOL["shutdown"]
PO_PUSHED = SEG_HEADER + POOL["pushed"]
PO_REPLACED = SEG_HEADER + POOL["replaced"]
PO_END = SEG_HEADER + POOL.size

POOL_RUN = 0
POOL_STOP = 2         # join() once nothing is left, or terminate(): workers exit

WORKER = Layout("worker", [
    # WS_*: written by the worker itself, except WS_DEAD (the parent, once
    # the process is reaped, before it starts the replacement).
    Field("state", 8, atomic=True),
    Field("pid", 8, atomic=True),
    Field("start", 8, atomic=True),      # the process's start time, for liveness (gc)
    Field("current", 8, atomic=True),    # the task it last took (-1: none): names a lost task
    Field("done", 8, atomic=True),       # tasks run (relaxed, owner-only)
    Field("steals", 8, atomic=True),     # tasks taken from other deques (relaxed, owner-only)
], size=CACHE_LINE)
WK_STATE = WORKER["state"]
WK_PID = WORKER["pid"]
WK_START = WORKER["start"]
WK_CURRENT = WORKER["current"]
WK_DONE = WORKER["done"]
WK_STEALS = WORKER["steals"]
WK_SIZE = WORKER.size

WS_IDLE = 0           # holds no task and will claim none before turning BUSY
WS_BUSY = 1
WS_DEAD = 2           # reaped by the parent: holds nothing any more
WS_EXITED = 3

ARENA_ALIGN = 64      # payload records are 64-byte aligned; a task names its record by offset >> 6
CHUNK = Layout("chunk", [
    Field("id", 8),       # the chunk's serial (never reused within a pool)
    Field("nbytes", 8),   # payload bytes that follow
    Field("flags", 8),    # CHUNK_SEGMENT: the payload is the name of a segment holding it
], size=32)
CK_ID = CHUNK["id"]
CK_NBYTES = CHUNK["nbytes"]
CK_FLAGS = CHUNK["flags"]
CK_DATA = CHUNK.size
CHUNK_SEGMENT = 1


def pool_layout(workers: int, dcap: int, icap: int, arena: int) -> dict:
    """Offsets and total size of a KIND_POOL segment (deque sizes from kernels.deque.words)."""
    from .deque import words
    table = _round_up(PO_END, CACHE_LINE)
    injector = _round_up(table + workers * WK_SIZE, CACHE_LINE)
    deques = _round_up(injector + 8 * words(icap), CACHE_LINE)
    dq_bytes = _round_up(8 * words(dcap), CACHE_LINE)
    arena_off = _round_up(deques + workers * dq_bytes, 4096)
    return {"table": table, "injector": injector, "deques": deques, "dq_bytes": dq_bytes,
            "arena": arena_off, "size": arena_off + _round_up(arena, 4096)}
