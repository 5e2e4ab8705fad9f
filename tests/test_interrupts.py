"""A Ctrl-C that lands while a checkpoint is written is held until the write and its record are done.

Each test sets the handlers it relies on and puts back what it found: a suite started in the background
(nohup, cron, some CI runners) inherits SIGINT ignored, not Python's default handler."""
import os
import signal

import pytest

from diffkd.engine.interrupts import interrupts_held


@pytest.fixture
def sigint_handler():
    """Set SIGINT's handler for the test (the argument given by parametrize, or Python's default), restore it after."""
    found = signal.getsignal(signal.SIGINT)

    def use(handler):
        signal.signal(signal.SIGINT, handler)
        return handler

    yield use
    signal.signal(signal.SIGINT, found)


def test_an_interrupt_inside_the_block_is_raised_after_it(sigint_handler):
    sigint_handler(signal.default_int_handler)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("write")  # still runs: the interrupt waits for the block's end
            done.append("record")
    assert done == ["write", "record"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back


def test_sigterm_goes_to_its_own_handler_after_the_block():
    heard = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: heard.append(signum))
    try:
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGTERM)
            assert heard == []
        assert heard == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_without_a_signal_nothing_happens(sigint_handler):
    sigint_handler(signal.default_int_handler)
    with interrupts_held():
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_ignored_on_entry_stays_ignored(sigint_handler):
    """Started with SIGINT ignored (in the background), a Ctrl-C during the block is ignored, as it would be
    anywhere else in the run, and the ignoring is what is left after the block."""
    sigint_handler(signal.SIG_IGN)
    with interrupts_held():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # not held: nothing to hold
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


@pytest.mark.integration
def test_the_suite_passes_with_sigint_ignored_as_in_the_background(tmp_path):
    """This file run in a child that starts with SIGINT ignored, as `nohup make test &` starts pytest."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-m", "not integration"],
                          capture_output=True, text=True, timeout=120, cwd=os.path.dirname(__file__),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert done.returncode == 0, done.stdout[-2000:]
