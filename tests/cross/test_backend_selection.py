"""Backend selection: use_backend is scoped to its thread/context, set_backend is the process default.

Issue 10 item 5: with a process-wide `use_backend`, two threads with overlapping blocks ran under each
other's setting and left `get_backend()` at the wrong value for good.
"""
import threading

import pytest
import torch

import leanvae_kernels as lk
from leanvae_kernels import _backend

TIMEOUT = 30  # seconds a barrier/event may wait before the test fails instead of hanging


@pytest.fixture(autouse=True)
def _restore_default():
    saved = _backend._default
    yield
    _backend._default = saved


def test_overlapping_blocks_in_threads_see_only_their_own_choice():
    # A enters, B enters (both blocks open: overlap is certain), each checks its own setting and that
    # ops really dispatch to it, then A exits FIRST while B is still inside, then B exits.
    lk.set_backend("auto")
    both_inside = threading.Barrier(2, timeout=TIMEOUT)
    a_exited = threading.Event()
    seen, errors = {}, []
    x, theta = torch.randn(64), torch.tensor([0.3])

    def probe(name):
        # get_backend() and what an op call resolves its backend=None to (resolve) must agree
        seen[name] = [lk.get_backend(), _backend.resolve(None)]

    def worker_a():
        try:
            with lk.use_backend("reference"):
                both_inside.wait()
                probe("a_inside")
                both_inside.wait()  # B has probed too
            probe("a_after")
            a_exited.set()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    def worker_b():
        try:
            with lk.use_backend("cpu"):
                both_inside.wait()
                probe("b_inside")
                lk.soft_threshold(x, theta)  # runs under "cpu" in this thread
                both_inside.wait()
                assert a_exited.wait(TIMEOUT), "thread A never left its block"
                probe("b_after_a_left")
            probe("b_after")
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker_a), threading.Thread(target=worker_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive(), "a worker thread hung"
    assert not errors, errors
    assert seen["a_inside"] == ["reference", "reference"]
    assert seen["b_inside"] == ["cpu", "cpu"]
    assert seen["b_after_a_left"] == ["cpu", "cpu"]  # A's exit did not reset B's block
    assert seen["a_after"] == ["auto", "auto"]
    assert seen["b_after"] == ["auto", "auto"]
    assert lk.get_backend() == "auto"  # the main thread never saw either block


def test_blocks_exit_in_any_order_restore_process_default():
    # Many threads, each nesting two blocks, released in a shuffled order by events.
    lk.set_backend("auto")
    n = 6
    inside = threading.Barrier(n, timeout=TIMEOUT)
    release = [threading.Event() for _ in range(n)]
    results, errors = [None] * n, []
    names = ["cpu", "reference", "cpu", "reference", "auto", "reference"]

    def worker(i):
        try:
            with lk.use_backend(names[i]):
                with lk.use_backend("reference" if names[i] == "cpu" else "cpu"):
                    inner = lk.get_backend()
                outer = lk.get_backend()
                inside.wait()
                assert release[i].wait(TIMEOUT)
                still = lk.get_backend()
            results[i] = (inner, outer, still, lk.get_backend())
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for i in (3, 0, 5, 1, 4, 2):
        release[i].set()
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive()
    assert not errors, errors
    for i, (inner, outer, still, after) in enumerate(results):
        assert inner == ("reference" if names[i] == "cpu" else "cpu")
        assert outer == still == names[i]
        assert after == "auto"
    assert lk.get_backend() == "auto"


def test_set_backend_is_the_process_default_seen_by_other_threads():
    previous = lk.set_backend("reference")
    got = []
    t = threading.Thread(target=lambda: got.append(lk.get_backend()))
    t.start()
    t.join(TIMEOUT)
    assert got == ["reference"]
    assert lk.set_backend(previous) == "reference"


def test_set_backend_inside_a_block_changes_the_default_not_the_block():
    lk.set_backend("auto")
    with lk.use_backend("cpu"):
        assert lk.set_backend("reference") == "auto"
        assert lk.get_backend() == "cpu"
    assert lk.get_backend() == "reference"


def test_block_restored_after_an_exception_and_bad_names_rejected():
    lk.set_backend("auto")
    with pytest.raises(RuntimeError, match="boom"):
        with lk.use_backend("reference"):
            raise RuntimeError("boom")
    assert lk.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        with lk.use_backend("junk"):
            pass
    with pytest.raises(ValueError, match="backend must be one of"):
        lk.set_backend("junk")
    assert lk.get_backend() == "auto"


def test_environment_variable_is_the_fallback(monkeypatch):
    _backend._default = None
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert lk.get_backend() == "reference"
    with lk.use_backend("cpu"):
        assert lk.get_backend() == "cpu"
    assert lk.get_backend() == "reference"
