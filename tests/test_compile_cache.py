"""The kernels' compile cache cannot serve code compiled from other sources.

Every cache entry is stamped with a hash of all of ``kernels/*.py`` taken
when ``kernels/_jit.py`` is imported. A process that sees the files change
after that (kernels edited while it runs) must stop using the cache: its
machine code may be from the old sources, and saved under the new stamp it
would be loaded by every later process (this happened: a stale ``get_at``).
"""
from __future__ import annotations

from kernels import _jit, ring


def _locator():
    fn = ring.counter_at.py_func
    for cls in (_jit._UserProvidedLocator, _jit._InTreeLocator, _jit._UserWideLocator, _jit._PrivateTempLocator):
        loc = cls.from_function(fn, fn.__code__.co_filename)
        if loc is not None:
            return loc
    raise AssertionError("no cache locator for the kernels")


def test_the_stamp_is_the_sources_hash_while_they_are_unchanged():
    assert _jit._fingerprint() == _jit._IMPORT_FINGERPRINT
    assert _locator().get_source_stamp() == _jit.source_hash()


def test_a_process_that_sees_the_sources_change_matches_no_cache_entry(monkeypatch):
    name, mtime, size = _jit._IMPORT_FINGERPRINT[0]
    monkeypatch.setattr(_jit, "_IMPORT_FINGERPRINT", ((name, mtime - 1, size),) + _jit._IMPORT_FINGERPRINT[1:])
    loc = _locator()
    a, b = loc.get_source_stamp(), loc.get_source_stamp()
    assert a != _jit.source_hash() and a.startswith("changed-since-import-") and a != b
