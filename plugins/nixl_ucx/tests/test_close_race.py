"""Teardown while UCX still owns operations: requests released in flight, then agents closed.

UCX keeps a request's puts and gets after posting them (cma queues its copies and performs them
during later progress). The backend must not free remote keys, unmap memory or destroy workers
under them: destroying a worker with queued copies aborts the whole process inside UCX.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import numpy as np
import pytest

from nixl_core.agent import Agent, AgentConfig
from nixl_core.backend import XferStatus
from nixl_core.descriptors import DescList

BLK = 4096
#: Descriptors per released request: above split_batch_size (1024), so a progress thread
#: posts them and the request is still running when released.
NDESC = 4096
ITERATIONS = 200


def _agent(name: str) -> Agent:
    return Agent(name, AgentConfig(backends=("UCX",)))


def _blocks(buf: np.ndarray, n: int) -> DescList:
    rows = np.empty((n, 3), np.uint64)
    rows[:, 0] = np.uint64(buf.ctypes.data) + np.arange(n, dtype=np.uint64) * np.uint64(BLK)
    rows[:, 1], rows[:, 2] = BLK, 0
    return DescList.from_array(rows, "DRAM")


def _poster(k: int, stop: threading.Event, done: list[int], errors: list[BaseException]) -> None:
    """Post and complete transfers on its own agent pair until told to stop, pausing 10 ms
    between them; every other request is dropped without release (its native state is then
    freed from this thread)."""
    try:
        with _agent(f"nixl-race-bg{k}a") as a, _agent(f"nixl-race-bg{k}b") as b:
            src = np.full(256 * BLK, k + 1, np.uint8)
            dst = np.zeros(256 * BLK, np.uint8)
            a.register(src)
            b.register(dst)
            a.add_remote(b.metadata())
            while not stop.is_set():
                req = a.create("WRITE", _blocks(src, 256), _blocks(dst, 256), b.name, merge=False)
                req.post()
                if req.wait(20) is not XferStatus.DONE:
                    raise AssertionError(f"background transfer ended {req.status}")
                if done[k] % 2:
                    req.release()
                del req
                done[k] += 1
                time.sleep(0.01)
            assert (dst == k + 1).all()
    except BaseException as exc:  # reported by the test, in the main thread
        errors.append(exc)


def _dropper(inbox: queue.Queue[object]) -> None:
    """Drop the last reference to whatever arrives, in this thread (None ends it)."""
    while True:
        item = inbox.get()
        if item is None:
            return
        del item


@pytest.mark.slow
def test_release_in_flight_then_close_200_times(caplog: pytest.LogCaptureFixture) -> None:
    """200 times: an agent pair; 16 MiB requests (a WRITE and a READ one way, a WRITE the other)
    posted and released while running, one more dropped unreleased in another thread; both
    agents closed at once, in alternating order; meanwhile two threads keep transferring on
    their own pair. Nothing aborts or hangs, no teardown had to leak anything,
    and the background transfers all completed."""
    caplog.set_level(logging.WARNING, logger="nixl_ucx")
    src = np.ones(NDESC * BLK, np.uint8)
    dst = np.zeros(NDESC * BLK, np.uint8)
    stop = threading.Event()
    done = [0, 0]
    errors: list[BaseException] = []
    posters = [threading.Thread(target=_poster, args=(k, stop, done, errors)) for k in (0, 1)]
    inbox: queue.Queue[object] = queue.Queue()
    dropper = threading.Thread(target=_dropper, args=(inbox,))
    for t in [*posters, dropper]:
        t.start()
    released_running = 0
    try:
        for it in range(ITERATIONS):
            a, b = _agent(f"nixl-race-a{it}"), _agent(f"nixl-race-b{it}")
            a.register(src)
            b.register(dst)
            a.add_remote(b.metadata())
            b.add_remote(a.metadata())
            mine, theirs = _blocks(src, NDESC), _blocks(dst, NDESC)
            reqs = [
                a.create("WRITE", mine, theirs, b.name, merge=False, notif=b"w"),
                a.create("READ", mine, theirs, b.name, merge=False),
                b.create("WRITE", theirs, mine, a.name, merge=False),
            ]
            for r in reqs:
                r.post()
            dropped = a.create("WRITE", mine, theirs, b.name, merge=False)
            dropped.post()
            inbox.put(dropped)
            del dropped
            for r in reqs:
                released_running += r.status is XferStatus.IN_PROGRESS
                r.release()
            first, second = (a, b) if it % 2 else (b, a)
            first.close()
            second.close()
            assert not errors, errors
    finally:
        stop.set()
        inbox.put(None)
        for t in [*posters, dropper]:
            t.join(60)
    assert not errors, errors
    assert released_running > ITERATIONS, "the requests finished before they were released"
    assert min(done) > 0
    assert not [r.getMessage() for r in caplog.records], "a teardown leaked or waited"
