"""actors/process.py: what an actor does to its own process once its state is built."""

import gc
import sys

import pytest

from fedmeta.actors import process


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()  # give the test process its collector back


def test_settle_freezes_what_is_alive_and_later_garbage_is_still_collected(unfrozen):
    class Node:
        pass

    before = process.settle()
    # a frozen object that dies after the freeze leaves the permanent generation (seen: one, at once)
    assert 0 < before["gc_frozen"] - 100 <= gc.get_freeze_count() <= before["gc_frozen"]
    # a cycle made after settling is still found by the collector (automatic collection held off,
    # so it is the explicit one that finds it, whatever the suite allocated before)
    gc.disable()
    try:
        a, b = Node(), Node()
        a.other, b.other = b, a
        del a, b
        assert gc.collect() >= 2
    finally:
        gc.enable()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_thresholds_are_raised_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert process.keep_freed_memory() is True


def test_without_glibc_nothing_changes(monkeypatch):
    monkeypatch.setattr(process.ctypes.util, "find_library", lambda name: "no-such-libc.so")
    assert process.keep_freed_memory() is False
