"""pytest-benchmark suites: fastoptim against the NumPy reference, per rule and size.

Run with ``python -m pytest bench/`` (the default ``pytest`` run collects ``tests/``
only). Each group (rule, dtype, size) holds three entries: ``numpy`` (the reference),
``fastoptim`` (one functional call, default threads) and ``traffic``, the
same-traffic, no-arithmetic loop that is the memory ceiling for that rule; compare
within a group. For the full, interleaved, layout-controlled measurement use
``python -m fastoptim.bench``: pytest-benchmark times each entry on its own, so on a
shared or frequency-scaling machine the ratios here are rougher.
"""
import numpy as np
import pytest

from fastoptim import _config, bench, functional, reference
from fastoptim.bench.contenders import _ceiling_contender

pytest.importorskip("pytest_benchmark")

SIZES = [1 << 14, 1 << 20]
IMPLS = ["numpy", "fastoptim", "traffic"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZES, ids=lambda n: f"2^{n.bit_length() - 1}")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rule_key", list(bench.RULES))
def test_step(benchmark, rule_key, dtype, size, impl):
    rule = bench.RULES[rule_key]
    arrays = bench.Arrays([(size,)], dtype, rule.n_state)
    P, G, S = arrays.params, arrays.grads, arrays.states
    steps = np.zeros(1, dtype=np.int64)
    benchmark.group = f"{rule.title} {dtype} 2^{size.bit_length() - 1}"
    benchmark.extra_info["bytes_per_step"] = (
        bench.bytes_per_element(rule, np.dtype(dtype).itemsize) * size)
    if impl == "traffic":
        threads = _config.get_num_threads()
        benchmark(_ceiling_contender(P, G, S, threads, passes=rule.passes).call)
    else:
        module = functional if impl == "fastoptim" else reference
        benchmark(rule.call, module, P, G, S, steps)
    # (Adafactor's step is relative to RMS(p): thousands of rounds of one gradient grow
    # p by (1 + lr) a step, to infinity -- the rule, not a fault)
    assert np.isfinite(P[0]).all() or rule.key == "adafactor"
