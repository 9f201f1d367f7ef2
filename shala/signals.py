"""Stop a run cleanly on SIGINT/SIGTERM: finish the current step, write a checkpoint, exit."""

from __future__ import annotations

import logging
import signal
from typing import Optional

log = logging.getLogger("shala.train")

__all__ = ["GracefulStop"]


class GracefulStop:
    """Context manager: ``requested`` turns True at the first signal; a second one stops at once."""

    def __init__(self):
        self.requested = False
        self.signal: Optional[int] = None  # the number of the first signal
        self._old = {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signal = True, signum
        log.warning("signal %d: finishing the current step, then writing a checkpoint", signum)

    def __enter__(self) -> "GracefulStop":
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread: signals cannot be caught here
            pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
