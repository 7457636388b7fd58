"""SharedDict against a plain dict: a hypothesis state machine.

Every rule does the same thing to a SharedDict and to a dict and compares
the answers; the invariant compares whole contents, through the handle that
wrote and through a second handle of the same table (which has to follow
growth it did not make). One or two shards and small values of every size
force many growths and compactions per run.
"""
from __future__ import annotations

import math

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import shm

scalars = st.one_of(
    st.text(max_size=6), st.binary(max_size=6), st.integers(-3, 3), st.integers(),
    st.sampled_from([0.0, -0.0, 1.0, 2.5, 1e20, -1e300, float("inf"), True, False, None]),
)
keys = st.one_of(scalars, st.tuples(scalars), st.tuples(scalars, st.tuples(scalars)))
values = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.text(max_size=20), st.none(), st.floats(allow_nan=False),
    st.binary(max_size=3000).map(bytes), st.lists(st.integers(-5, 5), max_size=4),
    st.builds(lambda n: "x" * n, st.integers(0, 70_000)),
)


def same(a, b) -> bool:
    """Equality with the canonical forms our keys come back in (True -> 1, 2.0 -> 2)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


class DictModel(RuleBasedStateMachine):
    @initialize(shards=st.sampled_from([1, 2]))
    def make(self, shards):
        self.d = shm.SharedDict(shards=shards)
        self.other = shm.SharedDict.open(self.d.name)
        self.model = {}

    def teardown(self):
        if hasattr(self, "d"):
            self.other.close()
            self.d.unlink()
            self.d.close()

    @rule(k=keys, v=values)
    def set(self, k, v):
        self.d[k] = v
        self.model[k] = v

    @rule(k=keys)
    def get(self, k):
        assert same(self.d.get(k, "<missing>"), self.model.get(k, "<missing>"))
        assert (k in self.d) == (k in self.model)

    @rule(k=keys)
    def delete(self, k):
        if k in self.model:
            del self.d[k]
            del self.model[k]
        else:
            try:
                del self.d[k]
            except KeyError:
                pass
            else:
                raise AssertionError(f"del {k!r} did not raise KeyError")

    @rule(k=keys)
    def pop(self, k):
        assert same(self.d.pop(k, "<none>"), self.model.pop(k, "<none>"))

    @precondition(lambda self: self.model)
    @rule()
    def popitem(self):
        k, v = self.d.popitem()
        assert k in self.model and same(self.model.pop(k), v)

    @rule(k=keys, v=values)
    def setdefault(self, k, v):
        assert same(self.d.setdefault(k, v), self.model.setdefault(k, v))

    @rule(k=keys, delta=st.integers(-1000, 1000))
    def incr(self, k, delta):
        old = self.model.get(k, 0)
        if type(old) is not int or not -(2**63) <= old + delta < 2**63:
            return      # incr on a non-integer raises TypeError (tested in test_dict.py)
        self.model[k] = old + delta
        assert self.d.incr(k, delta) == old + delta

    @rule(k=keys, new=values, hit=st.booleans())
    def compare_and_set(self, k, new, hit):
        expected = self.model.get(k, "<absent>") if hit else "<never stored>"
        if expected == "<absent>":
            return
        ok = self.d.compare_and_set(k, expected, new)
        assert ok == (k in self.model and self.model[k] == expected)
        if ok:
            self.model[k] = new

    @rule(k=keys, suffix=st.text(max_size=4))
    def alter(self, k, suffix):
        self.d.alter(k, lambda old: f"{old}{suffix}", default="")
        self.model[k] = f"{self.model.get(k, '')}{suffix}"

    @rule(items=st.dictionaries(keys, values, max_size=5))
    def update(self, items):
        self.d.update(items)
        self.model.update(items)

    @rule(ks=st.lists(keys, max_size=5))
    def get_many(self, ks):
        got = self.d.get_many(ks, default="<missing>")
        assert all(same(g, self.model.get(k, "<missing>")) for g, k in zip(got, ks))

    @rule()
    def clear(self):
        self.d.clear()
        self.model.clear()

    @invariant()
    def contents(self):
        if not hasattr(self, "d"):
            return
        assert len(self.d) == len(self.model)
        assert self.d.copy() == self.model
        assert self.other.copy() == self.model          # a second handle follows every growth


DictModel.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
TestDictModel = DictModel.TestCase
