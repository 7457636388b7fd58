"""kernels.layout: every offset follows from its declaration.

The offsets are recomputed here from the declared fields, independently of
``Layout.__init__``, and checked against the layouts and against the module
constants the kernels actually use (numba freezes those at compile time, so
a constant that drifted from its layout would silently address the wrong
word).
"""
from __future__ import annotations

from kernels import layout as L

LAYOUTS = {name: obj for name, obj in vars(L).items() if isinstance(obj, L.Layout)}
LINE = L.CACHE_LINE


def test_the_layouts_we_expect_are_declared():
    assert set(LAYOUTS) == {"SEGMENT", "CHANNEL", "PARTICIPANT", "TOKEN", "RING", "SLOT", "BLOB_ENTRY",
                            "DICT", "SHARD_ENTRY", "SHARD", "RECORD", "SYNC", "BROADCAST", "BSLOT",
                            "POOL", "WORKER", "CHUNK"}
    assert LINE == 128 and L.WORD == 8


def _end(layout, name):
    f = layout.fields[name]
    return layout[name] + (LINE if f.hot else f.size)


def test_offsets_follow_the_declaration():
    for name, lay in LAYOUTS.items():
        assert list(lay.offsets) == list(lay.fields)        # every field placed, in declared order
        expected = 0
        for fname, f in lay.fields.items():
            align = LINE if f.hot else f.align
            expected = -(-expected // align) * align        # round up to the declared alignment
            assert lay[fname] == expected, f"{name}.{fname} at {lay[fname]}, declared order puts it at {expected}"
            expected += LINE if f.hot else f.size
        # The size covers every field and is a multiple of the layout's alignment.
        assert lay.size >= expected, name
        assert lay.size % lay.align == 0, name


def test_declared_sizes():
    assert L.SEGMENT.size == L.SEG_HEADER == 256
    assert L.PARTICIPANT.size == L.PT_SIZE == 64
    assert L.TOKEN.size == L.TK_SIZE == 32
    assert L.SLOT.size == L.SLOT_HEADER == 32
    assert L.RING.size % LINE == 0 and L.CHANNEL.size % LINE == 0


def test_atomic_fields_are_whole_aligned_words():
    for name, lay in LAYOUTS.items():
        for fname, f in lay.fields.items():
            if f.atomic:
                assert lay[fname] % 8 == 0, f"{name}.{fname} at {lay[fname]} is not 8-byte aligned"
                assert f.size % 8 == 0 and f.size >= 8, f"{name}.{fname} is not made of whole words"


def test_hot_fields_own_their_cache_line():
    for name, lay in LAYOUTS.items():
        for hot, f in lay.fields.items():
            if not f.hot:
                continue
            start = lay[hot]
            assert start % LINE == 0, f"{name}.{hot} does not start a cache line"
            assert f.size <= LINE, f"{name}.{hot} is larger than its cache line"
            for other, g in lay.fields.items():
                lo, hi = lay[other], lay[other] + g.size
                assert other == hot or hi <= start or lo >= start + LINE, \
                    f"{name}.{other} shares the cache line of {hot}"


def test_at_least_the_ring_ends_and_futex_words_are_hot():
    assert L.RING.fields["head"].hot and L.RING.fields["tail"].hot
    for f in ("rx_seq", "tx_seq", "rx_waiters", "tx_waiters"):
        assert L.CHANNEL.fields[f].hot and L.CHANNEL.fields[f].atomic


def test_fields_do_not_overlap():
    for name, lay in LAYOUTS.items():
        spans = sorted((lay[n], lay[n] + f.size, n) for n, f in lay.fields.items())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            assert end <= start, f"{name}.{a} overlaps {name}.{b}"
        assert spans[-1][1] <= lay.size, name


def test_segment_header():
    S = L.SEGMENT
    assert S.size == 256
    # Everything but the state word is immutable and covered by the CRC; the
    # state word (mutable) comes after the CRC so it is not covered.
    assert list(S.fields)[-2:] == ["crc", "state"]
    assert L.SEG_CRC + 8 <= L.SEG_STATE
    assert all(S[n] + f.size <= L.SEG_CRC for n, f in S.fields.items() if n not in ("crc", "state"))
    assert S.fields["state"].atomic and L.SEG_STATE % 8 == 0
    assert L.SEG_STATE + 8 <= 256
    # The header ends where the first kind-specific structure may start.
    assert L.CH_BASE == L.BLOB_DATA == L.SEG_HEADER == 256
    assert L.FAMILY_LEN == 16 and L.NAME_LEN == 64      # a 63-character name fits, NUL-padded
    assert L.MAGIC == int.from_bytes(b"SHMPLAN1", "little")


def test_bitmaps_hold_every_participant():
    assert L.BITMAP_WORDS * 64 == L.MAX_PARTICIPANTS
    for f in ("rx_waiters", "tx_waiters", "tx_roles", "rx_roles"):
        assert L.CHANNEL.fields[f].size == 8 * L.BITMAP_WORDS
    assert L.MAX_TOKENS <= 64                             # one bitmap word per role
    assert L.MAX_PARTICIPANTS <= 256                      # one byte of owner in a slot stamp


CAPACITIES = [1, 2, 3, 7, 64, 1000, 4096]
SLOTS = [L.MIN_SLOT, 128, 192, 1024, 65536]


def test_channel_layout():
    for cap in CAPACITIES:
        for slot in SLOTS:
            _check_channel_layout(cap, slot)


def _check_channel_layout(cap, slot):
    lay = L.channel_layout(cap, slot)
    parts, toks, ring, size = lay["participants"], lay["tokens"], lay["ring"], lay["size"]
    for off in (parts, toks, ring):
        assert off % LINE == 0
    # header | control block | participants | tokens | ring header | slots | blob pool, in order, disjoint.
    assert L.CH_END <= parts
    assert parts + L.MAX_PARTICIPANTS * L.PT_SIZE <= toks
    assert toks + L.MAX_TOKENS * L.TK_SIZE <= ring
    assert ring + L.RING_HEADER + cap * slot == lay["pool"]
    assert lay["pool"] + cap * L.BE_SIZE == size
    assert all((lay["pool"] + k * L.BE_SIZE + L.BE_STATE) % 8 == 0 for k in range(min(cap, 64)))
    # Every atomic word of every participant, token and slot is 8-byte aligned.
    assert all((parts + k * L.PT_SIZE + L.PT_STATE) % 8 == 0 for k in range(L.MAX_PARTICIPANTS))
    assert all((toks + k * L.TK_SIZE + L.TK_STATE) % 8 == 0 for k in range(L.MAX_TOKENS))
    slots = ring + L.RING_HEADER
    assert slots % LINE == 0
    assert all((slots + k * slot + L.SL_STAMP) % 8 == 0 for k in range(min(cap, 64)))
    # The ring's hot words sit on their own lines in absolute terms too.
    assert (ring + L.RG_HEAD) % LINE == 0 and (ring + L.RG_TAIL) % LINE == 0
    assert (ring + L.RG_BLOB_HINT) % LINE == 0


def test_ring_layout():
    for cap in CAPACITIES:
        for slot in SLOTS:
            lay = L.ring_layout(cap, slot)
            assert lay["ring"] % LINE == 0
            assert lay["ring"] >= L.SEG_HEADER
            assert lay["pool"] == lay["ring"] + L.RING_HEADER + cap * slot
            assert lay["size"] == lay["pool"] + cap * L.BE_SIZE
            assert (lay["ring"] + L.RING_HEADER) % LINE == 0


def test_slot_sizes_keep_stamps_aligned():
    assert L.MIN_SLOT % L.SLOT_ALIGN == 0 and L.SLOT_ALIGN % 8 == 0
    assert L.MIN_SLOT > L.SLOT_HEADER


# Every offset constant the kernels use, with the layout field it must equal.
CONSTANTS = {
    "SEG_": (L.SEGMENT, 0, {
        "MAGIC": "magic", "VERSION": "version", "KIND": "kind", "SIZE": "size",
        "CREATOR_PID": "creator_pid", "CREATOR_START": "creator_start", "CREATED_NS": "created_ns",
        "PARAMS": "params", "FAMILY": "family", "NAME": "name", "CRC": "crc", "STATE": "state"}),
    "CH_": (L.CHANNEL, L.CH_BASE, {
        "RX_SEQ": "rx_seq", "RX_WAITERS": "rx_waiters", "TX_SEQ": "tx_seq", "TX_WAITERS": "tx_waiters",
        "TX_ROLES": "tx_roles", "RX_ROLES": "rx_roles", "TX_TOKENS": "tx_tokens", "RX_TOKENS": "rx_tokens",
        "TAIL_GEN": "tail_gen", "HEAD_GEN": "head_gen", "GROW": "grow", "TASKS": "tasks",
        "BLOB_BYTES": "blob_bytes",
        "BLOB_SEGMENTS": "blob_segments", "TOMBSTONES": "tombstones", "DROPPED": "dropped",
        "REAPED": "reaped", "BLOB_RESERVE": "blob_reserve"}),
    "PT_": (L.PARTICIPANT, 0, {"STATE": "state", "PID": "pid", "START": "start", "PIDNS": "pidns",
                               "ROLES": "roles", "OPS": "ops"}),
    "TK_": (L.TOKEN, 0, {"STATE": "state", "CREATED": "created_ns", "LENDER_PID": "lender_pid",
                         "LENDER_START": "lender_start"}),
    "RG_": (L.RING, 0, {"TAIL": "tail", "HEAD": "head", "CAP": "cap", "SLOT": "slot", "BASE": "base",
                        "GEN": "gen", "BLOB_HINT": "blob_hint"}),
    "SL_": (L.SLOT, 0, {"STAMP": "stamp", "META": "meta", "BLOB": "blob", "PAD": "pad"}),
    "BE_": (L.BLOB_ENTRY, 0, {"STATE": "state", "INFO": "info"}),
    "DC_": (L.DICT, L.DC_BASE, {
        "ROLES": "roles", "ROLES2": "roles2", "TOKENS": "tokens", "TOKENS2": "tokens2", "WAITERS": "waiters",
        "WAITERS2": "waiters2", "GROWTHS": "growths", "REPAIRS": "repairs", "REAPED": "reaped"}),
    "SE_": (L.SHARD_ENTRY, 0, {"LOCK": "lock", "GEN": "gen", "LOCK_WAITS": "lock_waits", "GROWTHS": "growths",
                               "VERSION": "version"}),
    "SH_": (L.SHARD, L.SH_BASE, {"STATE": "state", "BUMP": "bump", "COUNT": "count", "TOMBS": "tombs",
                                 "GARBAGE": "garbage"}),
    "RC_": (L.RECORD, 0, {"HASH": "hash", "INFO": "info", "VALUE": "value"}),
    "SY_": (L.SYNC, L.SY_BASE, {
        "VALUE": "value", "SEQ": "seq", "AUX": "aux", "FLAG": "flag", "WAITERS": "waiters",
        "WAITERS2": "waiters2", "ROLES": "roles", "ROLES2": "roles2", "TOKENS": "tokens", "TOKENS2": "tokens2",
        "REAPED": "reaped", "RECOVERED": "recovered"}),
    "BC_": (L.BROADCAST, L.BC_BASE, {
        "TAIL": "tail", "SEQ": "seq", "WAITERS": "waiters", "LOCK": "lock", "WAITERS2": "waiters2",
        "TX_ROLES": "tx_roles", "RX_ROLES": "rx_roles", "TX_TOKENS": "tx_tokens", "RX_TOKENS": "rx_tokens",
        "REAPED": "reaped", "RECOVERED": "recovered"}),
    "BS_": (L.BSLOT, 0, {"STAMP": "stamp", "LEN": "len", "KIND": "kind"}),
}


def test_module_constants_equal_layout_offsets():
    for prefix, (layout, base, table) in CONSTANTS.items():
        assert sorted(table.values()) == sorted(layout.fields), f"every {layout.name} field has a {prefix} constant"
        for const, field in table.items():
            assert getattr(L, prefix + const) == base + layout[field], f"{prefix}{const} != {layout.name}.{field}"


def test_no_unexplained_offset_constants():
    # A new SEG_/CH_/... constant must be added to CONSTANTS (or to the
    # non-offset list here), so it cannot drift from its layout unnoticed.
    not_offsets = {"SEG_HEADER", "SEG_INIT", "SEG_OPEN", "SEG_UNLINKED", "SEG_CLOSING", "SEG_STATE_MASK",
                   "CH_BASE", "CH_END", "PT_SIZE", "TK_SIZE", "BE_SIZE", "DC_BASE", "DC_END", "SE_SIZE", "SH_BASE",
                   "SH_END", "SY_BASE", "SY_END", "BC_BASE", "BC_END", "BS_DATA"}
    known = {p + c for p, (_, _, t) in CONSTANTS.items() for c in t} | not_offsets
    found = {n for n in vars(L) if n.startswith(tuple(CONSTANTS)) and isinstance(getattr(L, n), int)}
    assert found - known == set()
    assert L.CH_END == L.CH_BASE + L.CHANNEL.size


def test_dict_layouts():
    """The dict control segment and a shard generation: aligned, in order, non-overlapping."""
    assert L.SH_BASE % LINE == 0 and L.SH_BASE >= L.SEG_HEADER
    assert L.SE_SIZE == LINE                       # one shard's lock and generation per line
    assert L.ANNOUNCE_SIZE >= 64                   # one participant's announcement per 64-byte line
    assert L.RECORD_HEADER == 24 and L.RC_VALUE % 8 == 0
    for n in (1, 2, 8, 64, 4096):
        lay = L.dict_layout(n)
        assert L.DC_END <= lay["participants"] < lay["tokens"] < lay["table"] < lay["announce"] < lay["size"]
        assert lay["participants"] % LINE == 0 and lay["table"] % LINE == 0 and lay["announce"] % LINE == 0
        assert lay["announce"] - lay["table"] == n * L.SE_SIZE
        assert lay["size"] - lay["announce"] == L.MAX_PARTICIPANTS * L.ANNOUNCE_SIZE
    for nslots, heap in ((16, 4096), (1 << 10, 1 << 16), (1 << 20, 1 << 30)):
        lay = L.shard_layout(nslots, heap)
        assert lay["header"] == L.SH_BASE and lay["index"] == L.SH_END
        assert lay["heap"] >= lay["index"] + 8 * nslots and lay["heap"] % 64 == 0
        assert lay["size"] >= lay["heap"] + heap
    # A live index entry is (record offset / 8) << ENTRY_SHIFT | tag, and records start at heap
    # offset HEAP_START >= 8, so a live entry is at least 1 << ENTRY_SHIFT: never EMPTY or TOMB.
    from kernels import hashtable as H
    assert L.ENTRY_EMPTY == 0 and L.ENTRY_TOMB == 1 and H.HEAP_START >= 8
    assert (H.HEAP_START >> 3) << L.ENTRY_SHIFT > L.ENTRY_TOMB


def test_sync_layout():
    """A sync primitive's segment: its value and futex words hot, tables aligned, in order."""
    assert L.SY_BASE == L.SEG_HEADER and L.SY_END == L.SY_BASE + L.SYNC.size
    assert L.SYNC.fields["value"].hot and L.SYNC.fields["seq"].hot
    assert L.SY_VALUE % LINE == 0 and L.SY_SEQ % LINE == 0
    for f in ("waiters", "waiters2", "roles", "roles2"):
        assert L.SYNC.fields[f].size == 8 * L.BITMAP_WORDS
    lay = L.sync_layout()
    assert L.SY_END <= lay["participants"] < lay["tokens"] < lay["holds"] < lay["size"]
    assert lay["participants"] % LINE == 0 and lay["holds"] % LINE == 0
    assert lay["tokens"] - lay["participants"] == L.MAX_PARTICIPANTS * L.PT_SIZE
    assert lay["holds"] >= lay["tokens"] + L.MAX_TOKENS * L.TK_SIZE
    assert lay["size"] - lay["holds"] == L.MAX_PARTICIPANTS * L.WORD
    sharded = L.sync_layout(LINE)       # an RWLock: each participant's read count on its own line
    assert {k: sharded[k] for k in ("participants", "tokens", "holds")} == \
        {k: lay[k] for k in ("participants", "tokens", "holds")}
    assert sharded["size"] - sharded["holds"] == L.MAX_PARTICIPANTS * LINE and sharded["holds"] % LINE == 0
    assert L.KIND_NAMES[L.KIND_SYNC] == "sync" and len(set(L.KIND_NAMES)) == len(L.KIND_NAMES)


def test_broadcast_layout():
    """A broadcast segment: tail and seq hot, the lock on its own line, slots aligned after the tables."""
    assert L.BC_BASE == L.SEG_HEADER and L.BC_END == L.BC_BASE + L.BROADCAST.size
    assert L.BC_TAIL % LINE == 0 and L.BC_SEQ % LINE == 0 and L.BC_LOCK % LINE == 0
    assert len({L.BC_TAIL // LINE, L.BC_SEQ // LINE, L.BC_LOCK // LINE}) == 3
    assert L.BS_DATA == L.BSLOT.size == 32 and L.BS_STAMP % 8 == 0
    for cap, slot in ((1, 64), (16, 512), (1 << 16, 4096)):
        lay = L.broadcast_layout(cap, slot)
        assert L.BC_END <= lay["participants"] < lay["tokens"] < lay["slots"] < lay["size"]
        assert lay["slots"] % LINE == 0 and lay["size"] - lay["slots"] == cap * slot
        assert lay["slots"] >= lay["tokens"] + L.MAX_TOKENS * L.TK_SIZE
    assert L.KIND_NAMES[L.KIND_BROADCAST] == "broadcast" and len(set(L.KIND_NAMES)) == len(L.KIND_NAMES)


def test_pool_layout():
    from kernels import deque as DQ
    from kernels import pool as KP
    assert L.WORKER.size == L.WK_SIZE == LINE                # one worker per cache line
    assert L.CHUNK.size == L.CK_DATA and L.CK_DATA % 8 == 0
    for f in ("epoch", "wake", "sleepers"):
        assert L.POOL.fields[f].hot
    assert L.POOL.fields["sleepers"].size * 8 >= L.MAX_PARTICIPANTS        # a bit per worker slot
    assert L.PO_EPOCH == L.SEG_HEADER + L.POOL["epoch"] and L.PO_END == L.SEG_HEADER + L.POOL.size
    for workers in (1, 2, 3, 64, L.MAX_PARTICIPANTS):
        for dcap, icap in ((2, 2), (128, 1 << 16)):
            lay = L.pool_layout(workers, dcap, icap, 1 << 20)
            # header | control | worker table | injector | worker deques | arena, in order, disjoint, aligned.
            assert L.PO_END <= lay["table"] and lay["table"] % LINE == 0
            assert lay["table"] + workers * L.WK_SIZE <= lay["injector"] and lay["injector"] % LINE == 0
            assert lay["injector"] + 8 * DQ.words(icap) <= lay["deques"] and lay["deques"] % LINE == 0
            assert lay["dq_bytes"] >= 8 * DQ.words(dcap) and lay["dq_bytes"] % LINE == 0
            assert lay["deques"] + workers * lay["dq_bytes"] <= lay["arena"] and lay["arena"] % 4096 == 0
            assert lay["size"] - lay["arena"] >= 1 << 20
            # The deque's top and bottom each own a line at every deque.
            for i in range(min(workers, 4)):
                d = lay["deques"] + i * lay["dq_bytes"]
                assert (d + 8 * DQ.TOP) % LINE == 0 and (d + 8 * DQ.BOTTOM) % LINE == 0
    # A run's fields fit an int64 and an arena record offset fits above them.
    assert KP.REC_SHIFT == 32 and KP.START_SHIFT == 16 and KP.COUNT_MASK == 0xFFFF
    assert L.ARENA_ALIGN == 64
