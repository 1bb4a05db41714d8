"""The isolated pool of math-verify worker processes behind the symbolic fallback.

``math_verify`` never runs in the calling process. :func:`run_math_verify` hands each
comparison to a small, lazily started pool of reusable workers
(:mod:`prism_rl.reward.math_verify_worker`, run as ``sys.executable -P <file> <our pid>``)
under a soft deadline (enforced inside the worker) and a hard one (the caller stops waiting,
kills the worker and starts a fresh one in the background). Results are cached, so repeated
answers are free. Safe from any thread.

Bounded and contained: at most ``MAX_MATH_VERIFY_WORKERS`` workers per process; a worker never
has the working directory on ``sys.path`` and exits when this process dies (see the worker's
docstring); after ``MAX_FAILED_STARTS`` workers in a row fail to start, no more are started and
every comparison answers ``error`` at once. A worker that cannot import ``math_verify`` at all
(a broken install) raises :class:`MathVerifyUnavailable` instead, on that call and every later
one: scoring those answers 0 would bias every reward without a word.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

__all__ = ["MAX_MATH_VERIFY_WORKERS", "MathVerifyUnavailable", "close_math_verify_workers", "run_math_verify"]

logger = logging.getLogger(__name__)

HARD_TIMEOUT_GRACE_S = 1.0
WORKER_STARTUP_TIMEOUT_S = 60.0
MAX_MATH_VERIFY_WORKERS = max(1, min(4, os.cpu_count() or 1))
MAX_FAILED_STARTS = 3
_CACHE_SIZE = 8192

# -P (Python >= 3.11): neither the cwd nor the script's folder goes on sys.path, so nothing
# there can shadow the stdlib. Not -I: math_verify may be importable only via PYTHONPATH.
_WORKER_SCRIPT = Path(__file__).with_name("math_verify_worker.py")
_HEALTHY = frozenset({"true", "false", "unparsed", "timeout"})


class MathVerifyUnavailable(RuntimeError):
    """``math_verify`` cannot be imported by the worker's interpreter: the symbolic fallback of
    the accuracy reward cannot run at all."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"math-verify cannot be imported by {sys.executable} ({reason}): the accuracy reward's "
            "symbolic fallback needs it, and scoring its answers 0 would bias every reward quietly. "
            "Install prism-rl's dependencies (pip install 'math-verify[antlr4_13_2]>=0.8')")


class _Worker:
    """One ``math_verify`` child process speaking JSON lines over stdin/stdout."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-P", str(_WORKER_SCRIPT), str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            bufsize=1,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.ready = False
        self.start_failed = False
        self.missing: str | None = None   # why math_verify could not be imported, when it could not
        self.next_id = 0
        threading.Thread(target=self._pump, name="math-verify-reader", daemon=True).start()

    def _pump(self) -> None:
        """Move the child's output lines into ``self.lines``; ``None`` marks its end."""
        try:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                self.lines.put(line)
        except (OSError, ValueError):
            pass
        self.lines.put(None)

    def _next(self, timeout: float) -> dict | None:
        """Next decoded message, or ``None`` on timeout or when the child has gone."""
        try:
            line = self.lines.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None
        if line is None:
            self.lines.put(None)
            return None
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            return {}

    def ask(self, answer: str, gold: str, soft_s: float, hard_s: float) -> str:
        """Run one comparison: ``true``/``false``/``unparsed``/``timeout``/``hard_timeout``/``error``
        (or ``missing``: the child could not import ``math_verify``).

        The first call waits (up to ``WORKER_STARTUP_TIMEOUT_S``, not counted in the per-call
        deadline) for the child to finish importing ``math_verify``.
        """
        if not self.ready:
            msg = self._next(WORKER_STARTUP_TIMEOUT_S)
            if not msg or not msg.get("ready"):
                self.start_failed = True
                self.missing = (msg or {}).get("missing")
                return "missing" if self.missing else "error"
            self.ready = True
        self.next_id += 1
        req = {"id": self.next_id, "a": answer, "g": gold, "t": soft_s}
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except (OSError, ValueError):
            return "error"
        deadline = time.monotonic() + hard_s
        while True:
            msg = self._next(deadline - time.monotonic())
            if msg is None:
                return "hard_timeout" if self.proc.poll() is None else "error"
            if msg.get("id") == self.next_id:
                return str(msg.get("r"))

    def kill(self) -> None:
        """Terminate the child at once and reap it."""
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()  # type: ignore[union-attr]
            except (OSError, ValueError):
                pass


class _WorkerPool:
    """At most ``size`` workers, started on demand and reused; a failed one is replaced.

    Thread-safe: each call checks a worker out, so callers in several threads run in
    parallel up to ``size``. A worker that blew its hard deadline or died is killed and a
    replacement is started at once, so it imports ``math_verify`` in the background.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.pid = os.getpid()
        self.idle: list[_Worker] = []
        self.count = 0
        self.cond = threading.Condition()
        self.closed = False
        self.failed_starts = 0  # workers in a row that never became ready
        self.missing: str | None = None   # a worker could not import math_verify: why

    @property
    def broken(self) -> bool:
        return self.failed_starts >= MAX_FAILED_STARTS or self.missing is not None

    def _acquire(self) -> _Worker | None:
        """An idle worker, a new one while fewer than ``size`` exist, else wait for one;
        ``None`` once the pool is broken."""
        with self.cond:
            while not self.idle and self.count >= self.size and not self.broken:
                self.cond.wait()
            if self.broken:
                return None
            if self.idle:
                return self.idle.pop()
            self.count += 1
        try:
            return _Worker()
        except BaseException:
            with self.cond:
                self.count -= 1
                self.cond.notify()
            raise

    def _release(self, worker: _Worker, healthy: bool) -> None:
        """Return ``worker`` to the idle list; an unhealthy one is killed and replaced (unless
        workers keep failing to start: then the pool stops starting them)."""
        with self.cond:
            self.failed_starts = self.failed_starts + 1 if worker.start_failed else 0
            self.missing = self.missing or worker.missing
            broken = self.broken
        if broken:
            worker.kill()
            with self.cond:
                self.count -= 1
                self.cond.notify_all()
            return
        if not healthy:
            worker.kill()
            try:
                worker = _Worker()
            except OSError:
                with self.cond:
                    self.count -= 1
                    self.cond.notify()
                return
        with self.cond:
            if self.closed:
                worker.kill()
                return
            self.idle.append(worker)
            self.cond.notify()

    def run(self, answer: str, gold: str, soft_s: float, hard_s: float) -> str:
        """Compare on a pooled worker; see :meth:`_Worker.ask` for the results."""
        worker = self._acquire()
        if worker is None:
            return "missing" if self.missing else "error"
        result = "error"
        try:
            result = worker.ask(answer, gold, soft_s, hard_s)
        finally:
            self._release(worker, result in _HEALTHY)
        return result

    def close(self) -> None:
        """Kill every idle worker; busy ones are killed when they come back."""
        with self.cond:
            self.closed = True
            idle, self.idle = self.idle, []
        for w in idle:
            w.kill()


_pool: _WorkerPool | None = None
_pool_lock = threading.Lock()
_cache: OrderedDict[tuple[str, str, float], str] = OrderedDict()
_cache_lock = threading.Lock()
_warned = False


def _get_pool() -> _WorkerPool:
    """The process-wide pool, created on first use (and afresh in a forked child)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool.pid != os.getpid() or _pool.closed:
            _pool = _WorkerPool(MAX_MATH_VERIFY_WORKERS)
        return _pool


def close_math_verify_workers() -> None:
    """Stop the fallback's worker processes (also run at exit); the next call restarts them."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None and pool.pid == os.getpid():
        pool.close()


atexit.register(close_math_verify_workers)


def run_math_verify(answer: str, gold: str, timeout_s: float) -> str:
    """Compare on the pool with a soft deadline ``timeout_s`` and a hard one 1 s later.

    Returns ``true``/``false``/``unparsed``/``timeout``/``hard_timeout``/``error``. Results
    are cached (LRU, ``_CACHE_SIZE`` entries, timeouts included, errors not) by
    ``(answer, gold, timeout_s)``: the 16 rollouts of a prompt often repeat an answer. The
    first ``error`` logs one warning. Raises :class:`MathVerifyUnavailable` when the workers
    cannot import ``math_verify``.
    """
    global _warned
    key = (answer, gold, float(timeout_s))
    with _cache_lock:
        result = _cache.get(key)
        if result is not None:
            _cache.move_to_end(key)
    if result is None:
        pool = _get_pool()
        result = pool.run(answer, gold, float(timeout_s), float(timeout_s) + HARD_TIMEOUT_GRACE_S)
        if result == "missing":
            raise MathVerifyUnavailable(pool.missing or "unknown reason")
        if result != "error":
            with _cache_lock:
                _cache[key] = result
                if len(_cache) > _CACHE_SIZE:
                    _cache.popitem(last=False)
    if result == "error" and not _warned:
        _warned = True
        logger.warning(
            "math-verify worker failed (is math_verify importable by %s?); scoring 0", sys.executable
        )
    return result
