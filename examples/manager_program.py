"""A word count over a Pool, sharing its results through ``multiprocessing.Manager().dict()``.

    python examples/manager_program.py [fork|spawn|forkserver]

Written for a Manager dict. To run it on shm, change the one marked line:

    shared = manager.dict()   ->   shared = shm.SharedDict()

Nothing else changes: the workers get the dict as a task argument, and the
parent reads it with ``items()``, ``get``, ``in``, ``len``, ``setdefault``,
``update`` and ``del`` exactly as before; the output is the same.
(The ``with mp.Manager()`` block is then unused: delete it when you like.)

What improves: a Manager dict lives in a separate server process, and every
``shared[k]``, ``get`` or ``in`` is a pickle round trip over a socket to it.
A SharedDict lives in shared memory: every process reads and writes it
directly, with no manager process, no RPC, and reads that take no lock.

Each worker stores its result under its own key. A read-modify-write such as
``shared[k] = shared.get(k, 0) + 1`` from several processes loses updates on
either backend (two workers read the same old value); with a SharedDict, use
``shared.incr(k)``, an atomic add (``alter(k, fn, default)`` for any other
update). tests/test_dict_examples.py runs this program both ways.
"""
import multiprocessing as mp
import re
import sys

import shm  # only needed for the SharedDict line

TEXT = """\
It is a truth universally acknowledged, that a single man in possession
of a good fortune, must be in want of a wife.
However little known the feelings or views of such a man may be on his
first entering a neighbourhood, this truth is so well fixed in the minds
of the surrounding families, that he is considered the rightful property
of some one or other of their daughters.
"My dear Mr. Bennet," said his lady to him one day, "have you heard that
Netherfield Park is let at last?"
Mr. Bennet replied that he had not.
"But it is," returned she; "for Mrs. Long has just been here, and she
told me all about it."
Mr. Bennet made no answer.
"Do you not want to know who has taken it?" cried his wife impatiently.
"You want to tell me, and I have no objection to hearing it."
This was invitation enough.
"Why, my dear, you must know, Mrs. Long says that Netherfield is taken
by a young man of large fortune from the north of England; that he came
down on Monday in a chaise and four to see the place, and was so much
delighted with it, that he agreed with Mr. Morris immediately; that he
is to take possession before Michaelmas, and some of his servants are to
be in the house by the end of next week."
"""

LINES_PER_CHUNK = 3


def words(line):
    return re.findall(r"[a-z]+(?:'[a-z]+)?", line.lower())


def count_chunk(shared, i, lines):
    """Count the words of one chunk; store the counts under this chunk's own key."""
    skip = set(shared.get("stopwords", []))
    counts = {}
    for line in lines:
        for w in words(line):
            if w not in skip:
                counts[w] = counts.get(w, 0) + 1
    shared[f"chunk:{i:02d}"] = counts        # one key per task: no lost updates
    shared[f"lines:{i:02d}"] = len(lines)
    return i


def main():
    lines = TEXT.splitlines()
    chunks = [lines[i:i + LINES_PER_CHUNK] for i in range(0, len(lines), LINES_PER_CHUNK)]
    with mp.Manager() as manager:
        shared = manager.dict()  # <- change this one line to: shared = shm.SharedDict()
        shared.update({"status": "counting", "chunks": len(chunks)})
        shared.setdefault("stopwords", ["a", "the", "of", "to", "and", "in"])
        shared.setdefault("stopwords", ["ignored: the key is already there"])

        with mp.Pool(4) as pool:
            done = pool.starmap(count_chunk, [(shared, i, c) for i, c in enumerate(chunks)])
            pool.close()
            pool.join()
        shared["status"] = "merging"

        totals, per_chunk = {}, {}
        for key, value in shared.items():
            if key.startswith("chunk:"):
                per_chunk[key] = sum(value.values())
                for w, n in value.items():
                    totals[w] = totals.get(w, 0) + n
        shared["totals"] = totals

        print("chunks done", sorted(done) == list(range(len(chunks))), len(per_chunk), "of", shared["chunks"])
        print("keys in the shared dict", len(shared), "status", shared.get("status"))
        print("lines counted", sum(shared[f"lines:{i:02d}"] for i in range(len(chunks))), "of", len(lines))
        print("words per chunk", [per_chunk[k] for k in sorted(per_chunk)])
        top = sorted(shared["totals"].items(), key=lambda kv: (-kv[1], kv[0]))[:8]
        print("top words", ", ".join(f"{w}={n}" for w, n in top))
        print("total words", sum(totals.values()), "distinct", len(totals))
        print("'netherfield' in chunk 02:", "netherfield" in shared["chunk:02"],
              "/ chunk:99 present:", "chunk:99" in shared, "/ get:", shared.get("chunk:99", "-"))

        for i in range(len(chunks)):
            del shared[f"lines:{i:02d}"]
        del shared["status"]
        print("after cleanup", len(shared), "keys:", ", ".join(sorted(shared.keys())[:3]), "...")


if __name__ == "__main__":
    mp.set_start_method(sys.argv[1] if len(sys.argv) > 1 else "fork")
    main()
