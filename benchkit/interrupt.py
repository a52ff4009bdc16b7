"""Ctrl-C while `benchkit` runs: one line and exit 130, wherever it arrives (standard library only:
cli imports it before main runs).

Python raises KeyboardInterrupt at the next bytecode, and inside an import that goes wrong in ways
no `except` can mend: torch's C++ initialisation calls back into Python and aborts the process
(`terminate called after throwing an instance of 'pybind11::error_already_set'`), pydantic_core
turns it into a PanicException, a library's `try: import numpy` swallows it and goes on half
loaded. So while main runs, a Ctrl-C that lands inside an import waits for that import (the outermost
one: `import torch` as a whole) to finish and is raised right after it; a second Ctrl-C is raised
at once.
"""
from __future__ import annotations

import _thread
import signal
import sys
import threading
import time
from types import FrameType

POLL_S = 0.02   # how often a deferred Ctrl-C looks whether the import it waits for is over


class Interrupted(KeyboardInterrupt):
    """Ctrl-C as SigintWatch raises it. A subclass, so every `except KeyboardInterrupt` still catches
    it, while CPython does not take it for a bare KeyboardInterrupt that went unhandled through an
    extension's code and kill the process with SIGINT after main returned its status."""


def outermost_import(frame: FrameType | None, stop: FrameType | None = None) -> FrameType | None:
    """The frame of the outermost import running at `frame` (any module's body, any extension's
    init), looking no further down the stack than `stop`; None when no import is running."""
    found = None
    while frame is not None and frame is not stop:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            found = frame
        frame = frame.f_back
    return found


def _on_stack(target: FrameType, frame: FrameType | None) -> bool:
    while frame is not None:
        if frame is target:
            return True
        frame = frame.f_back
    return False


class SigintWatch:
    """Installed for the life of one `main` call (`with SigintWatch() as w:`); `w.seen` says a
    Ctrl-C came, which also explains an exception an interrupted import turned into something
    else. A handler someone else set (SIG_IGN under nohup, a host program's own) is left alone, as
    is a call from any thread but the main one: then this does nothing."""

    def __init__(self) -> None:
        self.seen = False
        self._waiting: FrameType | None = None   # the import a deferred Ctrl-C waits for
        self._done = False
        self._lock = threading.Lock()
        self._previous = None
        self._base: FrameType | None = None

    def __enter__(self) -> "SigintWatch":
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._base = sys._getframe(1)   # imports below main (main called from a module body) are not ours to wait for
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._done = True      # the waiting thread delivers nothing from now on
            self._waiting = self._base = None
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self._done:
            return
        self.seen = True
        if self._waiting is None and (outer := outermost_import(frame, self._base)) is not None:
            self._waiting = outer
            threading.Thread(target=self._after_import, args=(outer,), name="benchkit-sigint", daemon=True).start()
            return
        # Not inside an import, the deferred Ctrl-C come back once its import ended, or a second press.
        self._waiting = None
        raise Interrupted()

    def _after_import(self, outer: FrameType) -> None:
        main_id = threading.main_thread().ident
        while True:
            time.sleep(POLL_S)
            with self._lock:
                frame = sys._current_frames().get(main_id)
                if self._done or self._waiting is not outer or frame is None:
                    return
                if not _on_stack(outer, frame):
                    # A real signal also wakes a main thread blocked in a system call.
                    if hasattr(signal, "pthread_kill"):
                        signal.pthread_kill(main_id, signal.SIGINT)
                    else:
                        _thread.interrupt_main(signal.SIGINT)
                    return
