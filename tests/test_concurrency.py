"""Threads and processes: steps release the GIL, several Python threads can step
different optimizers at once (each entering its own OpenMP region) with the bits of
serial steps, and a child made by fork() after the parent used OpenMP does not hang.

What holds, and what does not:

* Different optimizers (on different arrays) may step from different Python threads
  at the same time. One optimizer, or one array, stepped from two threads at once is a
  data race, as for any in-place NumPy operation.
* GNU OpenMP (libgomp) keeps the thread team of a thread that ran a parallel region;
  after fork() the child has the bookkeeping but not the threads, and its first
  parallel region would wait for them forever. fastoptim registers an at-fork handler:
  in a forked child every kernel runs on the calling thread (see fastoptim._config).
  Every test that forks has a deadline, so a regression fails instead of hanging.
"""
import multiprocessing as mp
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest

import fastoptim
from fastoptim import functional as F

N = 1 << 18            # elements per array: far above the serial threshold set below
DEADLINE = 120         # seconds before a thread or child counts as deadlocked

OPTIMIZERS = [
    (fastoptim.SGD, dict(lr=0.01, momentum=0.9, nesterov=True)),
    (fastoptim.Adagrad, dict(lr=0.05, lr_decay=0.01)),
    (fastoptim.RMSprop, dict(lr=0.01, centered=True, momentum=0.3)),
    (fastoptim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.01)),
    (fastoptim.AdamW, dict(lr=0.01, state_dtype="bfloat16", rounding="stochastic")),
]


@pytest.fixture
def parallel_regions():
    """Every step of more than 1024 elements enters an OpenMP region of 2 threads."""
    fastoptim.set_serial_threshold(1024)
    fastoptim.set_num_threads(2)
    try:
        yield
    finally:
        fastoptim.set_serial_threshold(None)
        fastoptim.set_num_threads(None)


def _problem(k, nsteps):
    rng = np.random.default_rng(100 + k)
    params = [rng.standard_normal(N).astype(np.float32),
              rng.standard_normal((64, N // 64 + 3)).astype(np.float32)]
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in params]
             for _ in range(nsteps)]
    return params, grads


def _run(k, params, grads, barrier=None):
    cls, kw = OPTIMIZERS[k % len(OPTIMIZERS)]
    opt = cls(params, **kw)
    if barrier is not None:
        barrier.wait(timeout=DEADLINE)
    for g in grads:
        opt.step(g)
    return opt


def test_threads_stepping_different_optimizers_match_serial_steps(parallel_regions):
    nthreads, nsteps = 6, 8
    problems = [_problem(k, nsteps) for k in range(nthreads)]
    serial = [[p.copy() for p in params] for params, _ in problems]
    for k, (params, grads) in enumerate(problems):
        _run(k, serial[k], grads)

    concurrent = [[p.copy() for p in params] for params, _ in problems]
    barrier = threading.Barrier(nthreads)
    errors = []

    def work(k):
        try:
            _run(k, concurrent[k], problems[k][1], barrier)
        except BaseException as e:          # reported below, with the thread's index
            errors.append((k, e))

    threads = [threading.Thread(target=work, args=(k,), daemon=True)
               for k in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert not any(t.is_alive() for t in threads), "a stepping thread deadlocked"
    assert not errors, errors
    for k in range(nthreads):
        for a, b in zip(concurrent[k], serial[k]):
            np.testing.assert_array_equal(a, b, err_msg=f"thread {k}")


def test_functional_calls_from_many_threads_with_shared_read_only_grads(parallel_regions):
    """Eight threads, each updating its own parameter from the SAME gradient arrays
    (read only): every thread's result is the serial result."""
    rng = np.random.default_rng(7)
    grads = [rng.standard_normal(N) for _ in range(4)]
    for g in grads:
        g.flags.writeable = False
    want = np.zeros(N)
    steps = np.zeros(1, np.int64)
    m, v = np.zeros(N), np.zeros(N)
    for g in grads:
        F.adam_(want, g, m, v, None, steps, lr=0.1)
    results = [np.zeros(N) for _ in range(8)]
    barrier = threading.Barrier(8)

    def work(k):
        st, mm, vv = np.zeros(1, np.int64), np.zeros(N), np.zeros(N)
        barrier.wait(timeout=DEADLINE)
        for g in grads:
            F.adam_(results[k], g, mm, vv, None, st, lr=0.1)

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert not any(t.is_alive() for t in threads), "a stepping thread deadlocked"
    for r in results:
        np.testing.assert_array_equal(r, want)


def test_a_step_releases_the_gil():
    """While one thread runs a long step, another Python thread keeps running."""
    n = 1 << 23
    p, g = np.ones(n, np.float32), np.ones(n, np.float32)
    m, v, s = np.zeros_like(p), np.zeros_like(p), np.zeros(1, np.int64)
    count, stop = [0], threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1

    t = threading.Thread(target=spin, daemon=True)
    t.start()
    try:
        best = 0
        for _ in range(3):                  # a busy machine may not schedule it once
            step = F.prepare_adam(p, g, m, v, None, s)
            c0 = count[0]
            step.run(1)
            best = max(best, count[0] - c0)
            if best > 1000:
                break
        # holding the GIL for the whole step, the spinner would not advance at all
        assert best > 1000, f"the other thread advanced {best} times during a step"
    finally:
        stop.set()
        t.join(DEADLINE)


# --- fork ----------------------------------------------------------------------------

def _use_openmp():
    """Run parallel regions in this process, so that libgomp has a thread team."""
    p = np.ones(N, np.float32)
    for _ in range(3):
        F.sgd_(p, np.ones(N, np.float32), lr=0.1)


def _child_step(queue):
    p = np.arange(N, dtype=np.float32)
    steps = np.zeros(1, np.int64)
    m, v = np.zeros_like(p), np.zeros_like(p)
    F.adam_(p, np.full(N, 0.5, np.float32), m, v, None, steps, lr=0.1)
    opt = fastoptim.RMSprop([p], lr=0.01, centered=True)
    opt.step([np.full(N, -0.25, np.float32)])
    queue.put((fastoptim.get_num_threads(), fastoptim.config()["forked_child"],
               p.tobytes()))


def _expected_child_result():
    p = np.arange(N, dtype=np.float32)
    steps = np.zeros(1, np.int64)
    m, v = np.zeros_like(p), np.zeros_like(p)
    F.adam_(p, np.full(N, 0.5, np.float32), m, v, None, steps, lr=0.1)
    opt = fastoptim.RMSprop([p], lr=0.01, centered=True)
    opt.step([np.full(N, -0.25, np.float32)])
    return p.tobytes()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")
def test_multiprocessing_fork_after_openmp_does_not_hang(parallel_regions):
    _use_openmp()
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_step, args=(queue,), daemon=True)
    child.start()
    try:
        n_threads, forked, result = queue.get(timeout=DEADLINE)
    except Exception:
        child.kill()
        child.join(10)
        pytest.fail("the forked child did not finish a step: OpenMP deadlock after fork")
    child.join(DEADLINE)
    assert child.exitcode == 0
    assert n_threads == 1 and forked is True
    assert result == _expected_child_result()
    # the parent is unaffected: it still runs with its threads
    assert fastoptim.get_num_threads() == 2 or not fastoptim.config()["openmp"]
    assert fastoptim.config()["forked_child"] is False


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")
def test_os_fork_while_other_threads_hold_openmp_teams(parallel_regions):
    """Threads of the parent each own a libgomp team when the main thread forks;
    the child steps (and forks a grandchild that steps too) without hanging."""
    stop = threading.Event()

    def busy():
        p = np.ones(N, np.float32)
        while not stop.is_set():
            F.sgd_(p, np.full(N, 1e-6, np.float32), lr=0.1)

    workers = [threading.Thread(target=busy, daemon=True) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        _use_openmp()
        time.sleep(0.05)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                   # child
            code = 1
            try:
                os.setpgid(0, 0)       # its own group: a timeout kills the grandchild too
                os.close(r)
                p = np.ones(N, np.float32)
                F.sgd_(p, np.ones(N, np.float32), lr=0.5)
                gpid = os.fork()
                if gpid == 0:                          # grandchild
                    q = np.ones(N, np.float32)
                    F.sgd_(q, np.ones(N, np.float32), lr=0.25)
                    os._exit(0 if np.all(q == 0.75) else 3)
                _, status = os.waitpid(gpid, 0)
                ok = np.all(p == 0.5) and os.WIFEXITED(status) and \
                    os.WEXITSTATUS(status) == 0
                os.write(w, b"ok" if ok else b"bad")
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        try:
            os.setpgid(pid, pid)
        except OSError:                # the child did it first (or has already exited)
            pass
        deadline = time.monotonic() + DEADLINE
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung: OpenMP deadlock after fork")
            time.sleep(0.02)
        msg = os.read(r, 16)
        os.close(r)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert msg == b"ok"
    finally:
        stop.set()
        for w_ in workers:
            w_.join(DEADLINE)


def test_spawned_process_uses_threads_again():
    """A fresh interpreter (spawn) is not a forked child: it keeps its threads."""
    import subprocess
    code = ("import fastoptim; c = fastoptim.config(); "
            "print(c['forked_child'], c['num_threads'] == (c['omp_max_threads'] "
            "if c['openmp'] else 1))")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fastoptim.__file__)))
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=DEADLINE, check=True, env=env).stdout.split()
    assert out == ["False", "True"]
