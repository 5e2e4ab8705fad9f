"""A Ctrl-C that lands while a checkpoint is written is held until the write and its record are done."""
import os
import signal

import pytest

from diffkd.engine.interrupts import interrupts_held


def test_an_interrupt_inside_the_block_is_raised_after_it():
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


def test_without_a_signal_nothing_happens():
    with interrupts_held():
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
