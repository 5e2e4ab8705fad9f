"""Hold Ctrl-C and SIGTERM while a checkpoint is written, so what a stopped run says it saved is what is on disk."""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

HELD = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Run the block with SIGINT/SIGTERM held, then act on the first one received as its handler would.

    A signal ignored on entry (SIGINT in a process started in the background) stays ignored: there is nothing to
    hold. Outside the main thread (where Python runs no signal handler) the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    handlers = {sig: signal.getsignal(sig) for sig in HELD if signal.getsignal(sig) != signal.SIG_IGN}
    for sig in handlers:
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if received:
            handler = handlers[received[0]]
            if callable(handler):
                handler(received[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(received[0])
