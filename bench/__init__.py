"""Benchmarks of shm against its peers: ``python -m bench [group ...] [--quick]``.

Groups: ``channels`` (``bench/channels.py``). Results go to
``bench/results/`` (full runs) or ``bench/results/quick/`` (``--quick``).
"""
