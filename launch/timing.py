"""Timing helpers shared by the benchmarks in launch/."""
import statistics
import time


def interleaved(fns, repeats):
    """Median seconds per function, timing them in turn each round so that the load of a shared
    machine falls on every side alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]
