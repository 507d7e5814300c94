"""fileio.on_two_threads: every item worked on once, half on a second thread, and a failure on either
thread raised to the caller."""

from __future__ import annotations

import threading

import pytest

from tunec.compiler.fileio import on_two_threads


@pytest.mark.parametrize("n", [0, 1, 2, 7])
def test_every_item_is_worked_on_once_on_two_threads(n):
    seen: list[tuple[int, str]] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        with lock:
            seen.append((i, threading.current_thread().name))

    on_two_threads(list(range(n)), work, "second")
    assert sorted(i for i, _ in seen) == list(range(n))
    assert {i for i, name in seen if name == "second"} == set(range(1, n, 2))


@pytest.mark.parametrize("bad", [0, 1])  # an item of this thread's half, and of the other's
def test_a_failure_on_either_thread_reaches_the_caller(bad):
    def work(i: int) -> None:
        if i == bad:
            raise OSError(f"item {i}")

    with pytest.raises(OSError, match=f"item {bad}"):
        on_two_threads([0, 1, 2, 3], work)
