"""Where compile units run: worker processes on this machine, or Ray tasks on a cluster.

Chunks of rows are independent pure functions of their unit's spec, the
tokenizer and the few-shot pools, so where they run never changes the output.
``local`` runs them in order, in this process (one worker) or in a pool of
worker processes (spawned; or forked, when started ahead where this process
may fork). ``ray`` (``pip install 'tunec[ray]'``; imported only when
asked for) runs each missing unit as one Ray task that compiles its chunks and
writes the unit into the content-addressed cache, then returns; the main
process reads the units back from the cache and links locally, so the build is
byte-identical to a local one.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import Problem, TunecError
from .tokens import TokenizerInfo
from .units import WORKER_SIGNALS, Chunk, RowError, UnitResult, UnitSpec, compile_chunk, init_worker, init_worker_from

EXECUTORS = ("local", "ray")
WINDOW_PER_WORKER = 16  # chunks handed to the pool at a time, per worker


def row_error(exc: RowError) -> TunecError:
    part = "eval" if exc.part == "eval" else "train"
    where = f" [{exc.file}:{exc.line}]" if exc.line else (f" [{exc.file}]" if exc.file else "")
    row = "" if exc.row is None else f" row {exc.row}"  # None: a template that no row can render
    return TunecError(Problem(f"task '{exc.task}', {part}{row}: {exc.message}{where}"))


def usable_cpus() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a container's cpuset), else all."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity call on this platform
        return os.cpu_count() or 1


# Cores from which a compile starts its workers, and converts its local files, beside the tokenizer's load
# (:meth:`Workers.ahead`, :func:`.sources.prefetch_arrow`). On fewer, the tokenizer's load and the
# model-config check's child already keep every core busy: more processes beside them only slow the main
# process's own start (measured on 2 cores: the first chunk 0.1-0.3 s later, not earlier). There the
# workers start once the tokenizer is loaded (compiler/build.py), which on 2 cores brings the first chunk
# 0.1-0.2 s earlier.
SPARE_CORES_FROM = 4
SETUP = "setup.pickle"  # in a Workers' folder: the tokenizer, unit specs and few-shot pools, pickled


class Workers:
    """Worker processes started ahead of :func:`run_local`, e.g. while the main process loads the rows.

    Spawning one (an interpreter, the worker modules imported, the tokenizer built) takes ~0.5 s of
    CPU and needs only the tokenizer, the unit specs and the few-shot pools; begun as soon as those
    are known, it runs beside the loading instead of after it. With one worker none is started: the
    chunks compile in the main process. Close it, or use it as a context manager, when done.

    :meth:`ahead` starts them before even the tokenizer is loaded: each waits for :meth:`hand_over` to
    give it the tokenizer, specs and pools. Where this process may fork (:func:`can_fork`), ahead
    workers are forked instead of spawned: they start with its modules already imported, in ~10 ms.
    """

    def __init__(self, info: TokenizerInfo | None, specs: list[UnitSpec] | None, pools: dict[str, dict[str, list]],
                 workers: int, fork: bool = False):
        self.specs, self.workers = specs, workers
        self.pool: ProcessPoolExecutor | None = None
        self._starter: threading.Thread | None = None
        self._folder: Path | None = None  # holds the file each worker starts from
        self.forked = False
        if workers > 1:
            self._folder = Path(tempfile.mkdtemp(prefix="tunec-workers-"))  # this user's alone (mode 0700)
            try:
                if info is not None:
                    self._write_setup(info, specs or [], pools)
                # started ahead (no setup yet): the workers wait for this process to write it
                self.forked = fork and can_fork()
                self.pool, self._starter = _launch(self._folder / SETUP, workers,
                                                   None if info is not None else os.getpid(), self.forked)
            except BaseException:
                self.close()
                raise

    @property
    def _setup(self) -> Path | None:
        return None if self._folder is None else self._folder / SETUP

    @classmethod
    def ahead(cls, workers: int, fork: bool = False) -> "Workers":
        """``workers`` processes started now, waiting for :meth:`hand_over`; ``fork``: forked from this
        process where it may fork (:func:`can_fork`), spawned otherwise."""
        return cls(None, None, {}, workers, fork)

    def hand_over(self, info: TokenizerInfo, specs: list[UnitSpec], pools: dict[str, dict[str, list]]) -> None:
        """Give workers started :meth:`ahead` what they compile with (once)."""
        if self.specs is not None or self._folder is None:
            raise AssertionError("hand_over is for workers started ahead, once")
        self._write_setup(info, specs, pools)
        self.specs = specs

    def _write_setup(self, info: TokenizerInfo, specs: list[UnitSpec], pools: dict[str, dict[str, list]]) -> None:
        assert self._folder is not None
        tmp = self._folder / ".setup.tmp"
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
            pickle.dump((info, specs, pools), fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, self._folder / SETUP)  # a waiting worker sees the whole file or none

    def ready(self) -> ProcessPoolExecutor:
        """The pool, its processes all launched."""
        assert self.pool is not None, "a pool is started for two workers or more"
        if self._starter is not None:
            self._starter.join()
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            _stop(self.ready())
            self.pool = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def can_fork() -> bool:
    """Whether worker processes may be forked from this process now rather than spawned: on Linux, while
    no thread runs here but the main one. A forked worker starts with this process's modules imported,
    in ~10 ms; a spawned one is a new interpreter importing them, ~0.35 s of CPU. A fork copies only
    the thread that forks: a lock another thread held at that moment would stay held in the child for
    ever, so with other threads running the workers are spawned. (Threads of native libraries are
    their own to handle: numpy's BLAS and the tokenizer's pool reset themselves in a forked child.)"""
    return (sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
            and threading.current_thread() is threading.main_thread() and threading.active_count() == 1)


def _launch(setup: Path, workers: int, parent: int | None,
            fork: bool = False) -> tuple[ProcessPoolExecutor, threading.Thread | None]:
    """A pool of ``workers`` processes, each starting from the file ``setup`` (``parent``: not written
    yet, see :func:`.units.init_worker_from`), and the thread launching them (join it before reading the
    pool's processes; the pool's own methods wait for the launch by themselves). ``fork``: forked from
    this process, now and here (no thread: see :func:`can_fork`)."""
    # spawn: a clean interpreter per worker (fork after the tokenizer's thread
    # pool has started can deadlock), importing only the light worker modules.
    # concurrent.futures, not multiprocessing.Pool: a worker that dies (killed for memory, or one that
    # cannot start) breaks the pool and fails the compile at once, where a Pool would wait forever
    # for the chunk the dead worker held.
    ctx = multiprocessing.get_context("fork" if fork else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker_from,
                               initargs=(str(setup), True, parent, fork))
    widen_pipes(pool)

    def launch() -> None:
        # The pool starts its processes as work arrives: start them all now. Launching one waits for
        # the new interpreter to read its arguments - a fraction of a second each, which this thread
        # waits out instead of the caller.
        try:
            for _ in range(workers):
                pool.submit(int)
        except (BrokenProcessPool, RuntimeError):  # the pool's next use says so, or it is being shut down
            pass

    if fork:
        # A fork takes milliseconds, and must happen before the pool's own threads start (the first
        # submit forks every worker, then starts them): done here. Python 3.12+ warns of any fork in a
        # process with threads, counting the native ones can_fork leaves to their libraries. The
        # signals that end a worker are held back until the child has put its handlers back to a new
        # interpreter's (init_worker_from): none can run a handler of this program's in a worker.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*multi-threaded.*fork", category=DeprecationWarning)
                launch()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        return pool, None
    starter = threading.Thread(target=launch, name="tunec-spawn", daemon=True)
    starter.start()
    return pool, starter


PIPE_BYTES = 1 << 20  # Linux's default cap for an unprivileged pipe (/proc/sys/fs/pipe-max-size)


def widen_pipes(pool: ProcessPoolExecutor) -> None:
    """Give the pool's pipes (chunks out, results back) a megabyte each instead of 64 KiB, where the
    system allows it. A chunk's result is about a megabyte of token arrays: through a 64 KiB pipe the
    worker that sends it waits for the main process to read each 64 KiB piece (and a reading thread
    waits for the GIL each time), ~2 ms a chunk, 2-3% of a worker's time; with room for the whole
    result it hands it over and goes on to its next chunk. Nothing else changes: where the pipes
    cannot be widened (another system, a lower cap, a pool without these pipes) they stay as they are."""
    try:
        import fcntl

        setpipe = fcntl.F_SETPIPE_SZ  # Linux only
    except (ImportError, AttributeError):
        return
    for queue in (getattr(pool, "_result_queue", None), getattr(pool, "_call_queue", None)):
        reader = getattr(queue, "_reader", None)
        if reader is None:
            continue
        try:
            fcntl.fcntl(reader.fileno(), setpipe, PIPE_BYTES)
        except (OSError, ValueError):
            pass


def _stop(pool: ProcessPoolExecutor) -> None:
    """End the workers: chunks not yet started are dropped, running ones end with their processes."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)


def run_local(chunks: Iterable[Chunk], count: int, info: TokenizerInfo, specs: list[UnitSpec],
              pools: dict[str, dict[str, list]], workers: int,
              started: Workers | None = None) -> Iterator[tuple[Chunk, UnitResult]]:
    """Compile ``count`` chunks in order, here (one worker) or in ``workers`` spawned processes
    (``started``: processes spawned earlier for the same specs and pools, left running).

    Chunks are taken from ``chunks`` a window at a time (a few per worker), so
    the rows waiting for a worker stay few whatever the size of the data.
    """
    if started is not None and started.specs is not specs:
        raise AssertionError("run_local is handed workers started for other unit specs")
    workers = started.workers if started is not None else min(workers, count)  # spawning costs ~0.3 s a process
    try:
        if workers <= 1:
            with single_threaded_tokenizers():
                init_worker(info, specs, pools, single_thread=True)
                for chunk in chunks:
                    yield chunk, compile_chunk(chunk)
            return
        if started is not None and started.pool is not None:
            yield from _in_order(started.ready(), chunks, workers)
            return
        with Workers(info, specs, pools, workers) as spawned:
            yield from _in_order(spawned.ready(), chunks, workers)
    except RowError as exc:
        raise row_error(exc) from None
    except BrokenProcessPool:
        raise TunecError(Problem(
            "a compile worker process ended before its work was done (killed by the system, e.g. for memory, or "
            "unable to start: a script that compiles with --workers > 1 must do so under "
            "`if __name__ == \"__main__\":`, since workers are spawned and import the script); "
            "compile again, with fewer --workers if memory is short")) from None


def _in_order(pool, chunks: Iterable[Chunk], workers: int) -> Iterator[tuple[Chunk, UnitResult]]:
    """The chunks' results from ``pool``, in chunk order. A sliding window: a chunk is handed out as
    each result is taken, so no worker waits for the slowest chunk of a batch."""
    it = iter(chunks)
    pending: deque[tuple[Chunk, Future]] = deque()
    for chunk in itertools.islice(it, WINDOW_PER_WORKER * workers):
        pending.append((chunk, pool.submit(compile_chunk, chunk)))
    while pending:
        chunk, job = pending.popleft()
        result = job.result()
        for more in itertools.islice(it, 1):
            pending.append((more, pool.submit(compile_chunk, more)))
        yield chunk, result


@contextmanager
def single_threaded_tokenizers() -> Iterator[None]:
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


# ----------------------------------------------------------------- Ray


def _ray_unit(cache_root: str, key: str, spec: UnitSpec, chunks: list[Chunk], info: TokenizerInfo,
              pools: dict[str, dict[str, list]]) -> str:
    """One unit, compiled on a Ray worker and stored in the shared cache under ``key``."""
    from .cache import Cache

    writer = Cache(Path(cache_root)).unit_writer(key, len(spec.templates))
    try:
        with single_threaded_tokenizers():
            init_worker(info, [spec], pools, single_thread=True)
            for c in chunks:  # each chunk's result appended to the unit's file as it is made
                writer.add(compile_chunk(Chunk(0, c.rows, c.columns, c.docs)))
        writer.finish()
    finally:
        writer.abort()  # a failed task leaves no partial entry (after finish: nothing left to remove)
    return key


def run_ray(units: Iterable[tuple[str, UnitSpec, list[Chunk]]], info: TokenizerInfo,
            pools: dict[str, dict[str, list]], cache_root: Path, address: str | None,
            done: Callable[[int], None] = lambda n: None) -> None:
    """Compile each ``(key, spec, chunks)`` as a Ray task writing into the cache at ``cache_root``
    (``units`` is read as tasks are submitted: a generator keeps only the units in flight in memory).

    The cache folder must be one the workers share with this machine (a local
    cluster, or a shared filesystem). ``address``: a running cluster (``ray
    start --head``'s, or ``auto``); None starts a local one for this compile.
    """
    try:
        import ray
    except ImportError:
        raise TunecError("--executor ray needs Ray: pip install 'tunec[ray]' (or `pip install ray`)") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=1, max_retries=2, retry_exceptions=False)(_ray_unit)
        # Units are submitted a few per cluster CPU at a time, their rows read as they are submitted:
        # the rows held here (and in the object store) are those of the units in flight, not all of them.
        window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        todo = iter(units)
        pending: dict = {}
        while True:
            while len(pending) < window and (item := next(todo, None)) is not None:
                key, spec, chunks = item
                pool = {spec.task: pools[spec.task]} if spec.task in pools else {}
                pending[task.remote(str(cache_root), key, spec, chunks, info, pool)] = sum(len(c.rows) for c in chunks)
                del chunks, item
            if not pending:
                break
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                try:
                    ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, RowError):
                        raise row_error(cause) from None
                    raise TunecError(f"a Ray task failed: {str(exc).splitlines()[0]}") from None
                done(pending.pop(ref))
    finally:
        if started:
            ray.shutdown()
