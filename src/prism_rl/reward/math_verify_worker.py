"""The math-verify worker: a script run by :mod:`prism_rl.reward.math_verify_pool`.

Started as ``sys.executable -P math_verify_worker.py PARENT_PID`` (neither the working
directory nor this folder is on ``sys.path``; an empty or ``.`` entry that ``PYTHONPATH``
put there is removed before anything is imported, so a ``json.py`` where the user stands
cannot shadow the standard library). It dies with its parent: when its stdin closes, and,
should another process still hold that pipe open (a fork of the parent), when its parent
process is no longer ``PARENT_PID`` (checked twice a second by a watchdog thread).
It imports only ``math_verify`` (never ``prism_rl``, whose package may
import heavy code) and speaks JSON lines: it writes ``{"ready": true}`` once
``math_verify`` is imported (``{"ready": false, "missing": reason}`` and exit when it cannot
be imported), then answers each request ``{"id", "a", "g", "t"}`` with
``{"id", "r"}``, ``r`` one of ``true``/``false``/``unparsed``/``timeout``/``error``. Each
request runs under a soft deadline of ``t`` seconds (``setitimer``; the main thread owns
the signal). The real stdout is kept for the protocol and file descriptor 1 is pointed at
stderr, so stray prints cannot corrupt it. Importing this module does nothing.
"""

import os
import sys

# before any other import: sys and os are built in / frozen, everything else is looked up on sys.path
_CWD = os.getcwd()
sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.abspath(p) != _CWD]

import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

PARENT_CHECK_S = 0.5


class Deadline(BaseException):
    """Raised by the timer signal when a request runs past its soft deadline."""


def on_alarm(signum, frame):
    """``SIGALRM`` handler: abort the request in progress."""
    raise Deadline()


TIMER = hasattr(signal, "setitimer")


def protocol_stream():
    """A line-buffered copy of the real stdout; fd 1 and ``sys.stdout`` become stderr."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def make_judge(parse, verify):
    """``judge(pred, gold)`` -> ``true``/``false``/``unparsed`` with math-verify's own timeouts off."""

    def parse_any(s):
        got = parse("$" + s + "$", parsing_timeout=None)
        return got if got else parse(s, parsing_timeout=None)

    def judge(pred, gold):
        g = parse_any(gold)
        p = parse_any(pred) if g else None
        if not g or not p:
            return "unparsed"
        return "true" if verify(g, p, timeout_seconds=None) else "false"

    return judge


def run(judge, req):
    """Answer one request under its soft deadline ``req["t"]``."""
    try:
        if TIMER:
            signal.setitimer(signal.ITIMER_REAL, req["t"])
        try:
            return judge(req["a"], req["g"])
        finally:
            if TIMER:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except Deadline:
        return "timeout"
    except Exception:
        return "error"


def watch_parent(parent: int) -> None:
    """Exit at once when the parent process is gone (the worker is then reparented)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main():
    """Watch the parent, redirect stdout, import math_verify, say ready, then answer requests
    until stdin ends."""
    # Ctrl-C in a terminal signals the whole process group: the parent decides what a stop
    # means (finish the step, then save), so a worker must not die under the step in progress.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if len(sys.argv) > 1:
        watch_parent(int(sys.argv[1]))
    out = protocol_stream()
    logging.disable(logging.CRITICAL)
    try:
        from math_verify import parse, verify
    except ImportError as e:   # a broken install: say so, so the caller can stop with the reason
        out.write(json.dumps({"ready": False, "missing": f"{type(e).__name__}: {e}"}) + "\n")
        return

    judge = make_judge(parse, verify)
    if TIMER:
        signal.signal(signal.SIGALRM, on_alarm)
    out.write('{"ready": true}\n')
    for line in sys.stdin:
        req = json.loads(line)
        out.write(json.dumps({"id": req["id"], "r": run(judge, req)}) + "\n")


if __name__ == "__main__":
    main()
