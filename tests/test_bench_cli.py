"""The benchmark command runs end to end and writes well-formed results.

Nothing here asserts a speed: only that every measured quantity exists and is a
positive number, and that the arrays every contender shares are laid out as the
benchmark promises."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastoptim import _config, bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--quick", "--no-progress", "--case-s", "0.01", "--block-ms", "0.2",
        "--pause-ms", "0.1"]


def _positive(x):
    return isinstance(x, (int, float)) and x > 0 and np.isfinite(x)


def _torch_available():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def test_cli_json_fields(tmp_path, capsys):
    path = tmp_path / "out.json"
    rc = bench.main(["--sizes", "1024", "--rules", "adam,sgd", "--threads", "1,2",
                     "--no-model", "--json", str(path)] + TINY)
    assert rc == 0
    out = capsys.readouterr().out
    assert "Adam float32" in out and "Summary" in out
    res = json.loads(path.read_text())
    assert res["meta"]["threads"] == [1, 2]
    assert res["meta"]["fastoptim"]["kernel_path"]
    kinds = [(c["kind"], c["rule"], c["size"]) for c in res["cases"]]
    assert kinds == [("sweep", "adam", 1024), ("sweep", "sgd", 1024),
                     ("overhead", "adam", 16), ("overhead", "sgd", 16)]
    with_torch = _torch_available()
    for case in res["cases"]:
        rule = bench.RULES[case["rule"]]
        assert case["dtype"] == "float32"
        assert case["bytes_per_element"] == {"adam": 28, "sgd": 12}[case["rule"]]
        assert case["bytes_per_step"] == case["bytes_per_element"] * case["size"]
        assert case["reps"] >= 3
        assert sorted(case["ceiling"]) == ["1", "2"]
        for c in case["ceiling"].values():
            assert _positive(c["time_s"]) and _positive(c["gbps"])
        impls = {(r["impl"], r["variant"], r["threads"]) for r in case["rows"]}
        assert {("numpy", "", 1), ("fastoptim", "", 1), ("fastoptim", "", 2)} <= impls
        if case["kind"] == "overhead":
            assert ("fastoptim", "optimizer class", 2) in impls
        if with_torch:
            torch_variants = {v for i, v, _ in impls if i == "torch"}
            assert torch_variants == {"single-tensor", "foreach"} | (
                {"fused"} if rule.torch_fused else set())
        for r in case["rows"]:
            assert len(r["times_s"]) == case["reps"]
            assert all(_positive(t) for t in r["times_s"])
            for key in ("time_s", "gbps", "frac_ceiling", "speedup_vs_numpy"):
                assert _positive(r[key]), (key, r)
            assert _positive(r["speedup_vs_torch"]) if with_torch else (
                r["speedup_vs_torch"] is None)
            assert r["gbps"] == pytest.approx(case["bytes_per_step"] / r["time_s"] / 1e9)
        numpy_row = next(r for r in case["rows"] if r["impl"] == "numpy")
        assert numpy_row["speedup_vs_numpy"] == pytest.approx(1.0)
    assert any(t["what"].startswith("Adam float32 16") for t in res["targets"])


def test_cli_rejects_bad_arguments(capsys):
    assert bench.main(["--rules", "adamax"]) == 2
    assert "adamax" in capsys.readouterr().err
    assert bench.main(["--sizes", "2^x"]) == 2
    assert "2^x" in capsys.readouterr().err
    assert bench.main(["--threads", "0"]) == 2
    assert bench.main(["--dtypes", "float16"]) == 2


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "out.json"
    png = tmp_path / "out.png"
    rc = bench.main(["--sizes", "512,2048", "--rules", "rmsprop", "--threads", "1",
                     "--no-model", "--no-overhead", "--no-torch", "--json", str(path),
                     "--plot", str(png)] + TINY)
    assert rc == 0
    res = json.loads(path.read_text())
    assert [c["size"] for c in res["cases"]] == [512, 2048]
    assert res["meta"]["torch"] is None
    assert all(r["impl"] in ("numpy", "fastoptim") for c in res["cases"] for r in c["rows"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parse_size():
    assert bench.parse_size("16384") == 1 << 14
    assert bench.parse_size("2^25") == 1 << 25
    assert bench.parse_size("2**10") == 1024
    assert bench.parse_size("1e6") == 10 ** 6
    assert bench.parse_size("16k") == 1 << 14
    assert bench.parse_size("4M") == 1 << 22
    for bad in ("0", "-3", "1.5", "abc", "2^"):
        with pytest.raises(ValueError, match="bad size"):
            bench.parse_size(bad)


@pytest.mark.parametrize("rule,itemsize,expected", [
    ("sgd", 4, 12), ("sgd_momentum", 4, 20), ("adagrad", 4, 20), ("rmsprop", 4, 20),
    ("adam", 4, 28), ("adamw", 4, 28), ("adam", 8, 56), ("sgd", 8, 24)])
def test_bytes_per_element(rule, itemsize, expected):
    assert bench.bytes_per_element(bench.RULES[rule], itemsize) == expected


def test_carve_arrays_layout():
    shapes = [(3, 5), (4096,), (1 << 16,), (7,)]
    roles = bench.carve_arrays(shapes, np.float32, 4)
    arrays = [a for role in roles for a in role]
    assert [a.shape for a in roles[2]] == shapes
    spans = sorted((a.ctypes.data, a.ctypes.data + a.nbytes) for a in arrays)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end                       # no overlap
    for a in arrays:
        assert a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
        assert a.ctypes.data % 64 == 0
    for i in range(len(shapes)):                  # a parameter's arrays never alias
        addrs = [roles[r][i].ctypes.data for r in range(4)]
        for x in addrs:
            for y in addrs:
                if x != y:
                    assert (x - y) % 4096 != 0


def test_torch_state_lives_in_the_shared_arrays():
    torch = pytest.importorskip("torch")
    rule = bench.RULES["adam"]
    arrays = bench.Arrays([(1000,), (24,)], np.float32, rule.n_state)
    contenders = bench.build_contenders(rule, arrays, [1], torch=torch)
    torch_rows = [c for c in contenders if c.impl == "torch"]
    assert {c.variant for c in torch_rows} == {"single-tensor", "foreach", "fused"}
    for c in torch_rows:
        opt = c.call.__self__
        for i, p in enumerate(opt.param_groups[0]["params"]):
            assert p.data_ptr() == arrays.params[i].ctypes.data
            assert p.grad.data_ptr() == arrays.grads[i].ctypes.data
            st = opt.state[p]
            assert st["exp_avg"].data_ptr() == arrays.states[0][i].ctypes.data
            assert st["exp_avg_sq"].data_ptr() == arrays.states[1][i].ctypes.data
    before = arrays.params[0].copy()
    torch_rows[0].call()
    assert not np.array_equal(before, arrays.params[0])


def test_transformer_shapes():
    shapes = bench.transformer_shapes()
    sizes = [int(np.prod(s)) for s in shapes]
    assert 150 <= len(shapes) <= 250
    assert 5_000_000 <= sum(sizes) <= 10_000_000
    assert min(sizes) < 1000 and max(sizes) > 1_000_000


def test_import_fastoptim_stays_light():
    code = ("import sys, fastoptim; "
            "bad = [m for m in ('torch', 'matplotlib', 'fastoptim.bench') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    # the installed package (conftest runs tests outside the checkout)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("rule_key", list(bench.RULES))
def test_every_contender_runs(rule_key):
    try:
        import torch
    except ImportError:
        torch = None
    rule = bench.RULES[rule_key]
    arrays = bench.Arrays([(33,), (4, 5)], np.float64, rule.n_state)
    notes = []
    contenders = bench.build_contenders(rule, arrays, [1, 2], torch=torch,
                                        warm_prefix=8, notes=notes)
    assert notes == []
    impls = [(c.impl, c.threads) for c in contenders]
    assert impls[:3] == [("numpy", 1), ("fastoptim", 1), ("fastoptim", 2)]
    assert ("ceiling", 1) in impls and ("ceiling", 2) in impls
    saved = _config._num_threads
    try:
        for c in contenders:
            before = [p.copy() for p in arrays.params]
            if c.before:
                c.before()
            c.warm()
            c.call()
            c.call()
            if c.settle:
                c.settle(2, 1)
            if c.impl != "ceiling":     # every rule moves the parameters
                assert not np.array_equal(before[1], arrays.params[1]), c.label
    finally:
        _config._num_threads = saved
    for lst in [arrays.params] + arrays.states[:rule.n_state]:
        for a in lst:
            assert np.isfinite(a).all()


@pytest.mark.parametrize("rule_key", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("warm_prefix", [None, 8])
def test_ceiling_leaves_the_shared_arrays_as_it_found_them(rule_key, warm_prefix):
    rule = bench.RULES[rule_key]
    arrays = bench.Arrays([(40,), (3, 7)], np.float32, rule.n_state)
    for lst in arrays.states:                  # distinct values in every array
        for a in lst:
            a[...] = np.arange(a.size, dtype=a.dtype).reshape(a.shape) + 0.5
    ceilings = [c for c in bench.build_contenders(rule, arrays, [1, 2],
                                                  warm_prefix=warm_prefix)
                if c.impl == "ceiling"]
    assert [c.period for c in ceilings] == [1 + rule.n_state] * 2
    snapshot = [a.copy() for lst in [arrays.params, arrays.grads] + arrays.states
                for a in lst]
    profile = bench.Profile(block_s=1e-5, case_s=0.0, min_reps=4, max_reps=4,
                            pause_s=0.0)
    times, reps, k = bench.measure(ceilings, profile)
    assert reps == 4 and all(len(t) == 4 for t in times.values())
    after = [a for lst in [arrays.params, arrays.grads] + arrays.states for a in lst]
    for x, y in zip(snapshot, after):
        np.testing.assert_array_equal(x, y)
    if rule.n_state:                            # and it does move values around
        ceilings[0].call()
        assert not np.array_equal(snapshot[0], arrays.params[0])
