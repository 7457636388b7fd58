"""A classic multiprocessing producer/consumer program (after the CPython docs).

Written for multiprocessing's queues. To run it on shm, change one line:

    from multiprocessing import JoinableQueue, Queue   ->   from shm import JoinableQueue, Queue

tests/test_queues.py runs it both ways and compares the output.
"""
import sys
from multiprocessing import Process, current_process

from multiprocessing import JoinableQueue, Queue  # the one line to change


def mul(a, b):
    return a * b


def plus(a, b):
    return a + b


def calculate(func, args):
    return f"{func.__name__}{args} = {func(*args)}"


def worker(tasks, results):
    for func, args in iter(tasks.get, "STOP"):
        results.put((current_process().name != "", calculate(func, args)))


def joinable_worker(jobs, totals):
    while True:
        item = jobs.get()
        try:
            if item is None:
                return
            totals.put(sum(item))
        finally:
            jobs.task_done()


def main(n_workers=4):
    tasks, results = Queue(), Queue()
    tasks1 = [(mul, (i, 7)) for i in range(20)]
    tasks2 = [(plus, (i, 8)) for i in range(10)]
    for t in tasks1:
        tasks.put(t)
    workers = [Process(target=worker, args=(tasks, results)) for _ in range(n_workers)]
    for w in workers:
        w.start()
    out = [results.get(timeout=60) for _ in tasks1]
    for t in tasks2:
        tasks.put(t)
    out += [results.get(timeout=60) for _ in tasks2]
    for _ in workers:
        tasks.put("STOP")
    for w in workers:
        w.join()

    jobs, totals = JoinableQueue(maxsize=8), Queue()
    jw = [Process(target=joinable_worker, args=(jobs, totals)) for _ in range(2)]
    for w in jw:
        w.start()
    for i in range(50):
        jobs.put(list(range(i)))
    jobs.join()                     # returns once every job was marked done
    done = sorted(totals.get(timeout=60) for _ in range(50))
    for _ in jw:
        jobs.put(None)
    jobs.join()
    for w in jw:
        w.join()

    for ok, line in sorted(out, key=lambda x: x[1]):
        print(ok, line)
    print("totals", done)
    print("qsize after", tasks.qsize(), results.qsize(), totals.qsize(), "empty", results.empty())


if __name__ == "__main__":
    import multiprocessing
    multiprocessing.set_start_method(sys.argv[1] if len(sys.argv) > 1 else "fork")
    main()
