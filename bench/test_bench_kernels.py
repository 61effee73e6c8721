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
        prepare = _config._kernels.prepare_traffic
        benchmark(lambda: prepare(P, G, S).run(threads))
    else:
        module = functional if impl == "fastoptim" else reference
        benchmark(rule.call, module, P, G, S, steps)
    assert np.isfinite(P[0]).all()
