"""Threads and processes: the kernels' thread count, one-thread twins, forked processes, and
modules called from several Python threads at once."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import compare_modules, make_pair
from torch import nn

import fastrnn


def _x(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _forked_child(connection) -> None:
    """In a forked process: fastrnn against torch.nn, the result sent back as a string."""
    try:
        torch.set_num_threads(1)  # torch's own pool can't run after fork() either
        from fastrnn import recurrence_cpu

        assert recurrence_cpu._forked, "the fork handler didn't run"
        for name, kwargs in (("RNN", dict(bidirectional=True)), ("LSTM", dict(num_layers=2))):
            ref, fast = make_pair(name, 3, 4, **kwargs)
            compare_modules(ref, fast, _x(5, 2, 3))
        connection.send("ok")
    except BaseException as error:  # reported by the parent
        connection.send(repr(error))


def test_kernel_threads_follow_torch_and_numba_settings():
    """The kernels' thread count: torch's setting, capped by Numba's (read without its locks
    once its pool runs) and by the CPUs."""
    import numba

    from fastrnn import recurrence_cpu

    ref, fast = make_pair("RNN", 3, 4)
    compare_modules(ref, fast, _x(5, 2, 3))  # Numba's pool has started
    torch_before, numba_before = torch.get_num_threads(), numba.get_num_threads()
    cpus = recurrence_cpu._CPUS
    try:
        numba.set_num_threads(1)
        assert recurrence_cpu._numba_threads() == 1 and recurrence_cpu._threads() == 1
        numba.set_num_threads(numba_before)
        assert recurrence_cpu._numba_threads() == numba_before
        torch.set_num_threads(1)
        assert recurrence_cpu._threads() == 1
        torch.set_num_threads(64)
        assert recurrence_cpu._threads() == min(numba_before, cpus)
    finally:
        torch.set_num_threads(torch_before)
        numba.set_num_threads(numba_before)


_KEEPS_TORCH_THREADS = """
import torch, fastrnn
torch.set_num_threads(1)
fastrnn.LSTM(4, 4)(torch.randn(3, 2, 4))
print(torch.get_num_threads())
"""


def test_first_kernel_call_keeps_torch_thread_setting():
    """Starting Numba's OpenMP pool (the process's first kernel call) resets the OpenMP thread
    count that torch shares; a user's torch.set_num_threads(1) must survive it. A fresh process,
    since the pool starts once."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", _KEEPS_TORCH_THREADS],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "1"


def test_serial_kernels_run_the_twins_on_one_thread():
    """`recurrence_cpu.serial_kernels` (what a forked child runs, and what precompile --forked
    compiles): the serial twins, one thread, torch's results; the parallel kernels after."""
    from fastrnn import recurrence_cpu

    parallel = recurrence_cpu._rnn_forward
    with recurrence_cpu.serial_kernels():
        assert recurrence_cpu._rnn_forward is recurrence_cpu._rnn_kernels.rnn_forward_serial
        assert recurrence_cpu._threads() == 1
        ref, fast = make_pair("RNN", 3, 4, bidirectional=True)
        compare_modules(ref, fast, _x(5, 2, 3))
    assert recurrence_cpu._rnn_forward is parallel
    assert not recurrence_cpu._serial


def test_forked_process_runs_the_kernels():
    """A process forked after the kernels (and torch's pool) ran, as torch.multiprocessing's
    Hogwild training does: GNU OpenMP can't run a parallel region there (it hung, or Numba
    terminated the child), so the child runs the kernels' serial twins, with torch.nn's
    results."""
    import multiprocessing

    ref, fast = make_pair("RNN", 3, 4, bidirectional=True)
    compare_modules(ref, fast, _x(5, 2, 3))  # the parent has used OpenMP
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running
        child = context.Process(target=_forked_child, args=(sender,))
        child.start()
    child.join(timeout=300)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked process hung")
    assert child.exitcode == 0, child.exitcode
    assert receiver.recv() == "ok"


def test_modules_called_from_several_python_threads_at_once():
    """The kernels release the GIL and keep their per-call state (scratch buffers, batch-1
    helper counters) per thread or per call: four threads running forward+backward and
    inference at once, at batch 1 (owner and helper threads sharing products) and batch 3,
    get torch.nn's results."""
    import threading

    cases = [
        (fastrnn.LSTM, nn.LSTM, 1),
        (fastrnn.GRU, nn.GRU, 3),
        (fastrnn.LSTM, nn.LSTM, 3),
        (fastrnn.RNN, nn.RNN, 1),
    ]
    failures: list[str] = []

    def run(index: int, fast_cls, ref_cls, batch: int) -> None:
        try:
            generator = torch.Generator().manual_seed(index)
            torch.manual_seed(index)
            fast = fast_cls(8, 128, batch_first=True)
            ref = ref_cls(8, 128, batch_first=True)
            ref.load_state_dict(fast.state_dict())
            for step in range(6):
                x = torch.randn(batch, 7, 8, generator=generator, requires_grad=True)
                y_fast = fast(x)[0]
                y_fast.sum().backward()
                dx_fast, x.grad = x.grad, None
                y_ref = ref(x)[0]
                y_ref.sum().backward()
                with torch.no_grad():
                    y_inference = fast(x)[0]
                if not (
                    torch.allclose(y_fast, y_ref, atol=1e-5)
                    and torch.allclose(dx_fast, x.grad, atol=1e-5)
                    and torch.allclose(y_inference, y_ref, atol=1e-5)
                    and torch.allclose(fast.weight_hh_l0.grad, ref.weight_hh_l0.grad, atol=1e-4)
                ):
                    failures.append(f"thread {index} step {step}: results differ from torch.nn")
                    return
        except Exception as error:  # reported below, with the thread it came from
            failures.append(f"thread {index}: {error!r}")

    threads = [threading.Thread(target=run, args=(i, *case)) for i, case in enumerate(cases)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    assert not failures, failures


def test_reused_buffers_are_poisoned_under_test():
    """The suite's `poisoned_scratch` fixture is active: a reused buffer comes back as NaN every
    time, also after it was written, so stale values can't hide an unwritten element."""
    from fastrnn.scratch import scratch

    like = torch.zeros(1)
    first = scratch("poison-check", (2, 3), like)
    assert torch.isnan(first).all()
    first.zero_()
    assert torch.isnan(scratch("poison-check", (2, 3), like)).all()
