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
                     "--no-model", "--targets", "--json", str(path)] + TINY)
    assert rc == 0
    out = capsys.readouterr().out
    assert "Adam float32" in out and "Summary" in out
    res = json.loads(path.read_text())
    assert res["meta"]["threads"] == [1, 2]
    assert res["meta"]["fastoptim"]["kernel_path"]
    assert res["meta"]["cpu_model"]
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
        assert _positive(case["wall_s"])
        assert case["other_load_cores"] is None or case["other_load_cores"] >= 0
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
            for key in ("time_s", "gbps", "speedup_vs_numpy"):
                assert _positive(r[key]), (key, r)
            if case["kind"] == "overhead":     # call overhead: no fraction of ceiling
                assert r["frac_ceiling"] is None
            else:
                assert _positive(r["frac_ceiling"]) or r["ceiling_suspect"], r
            assert _positive(r["speedup_vs_torch"]) if with_torch else (
                r["speedup_vs_torch"] is None)
            assert r["gbps"] == pytest.approx(case["bytes_per_step"] / r["time_s"] / 1e9)
        numpy_row = next(r for r in case["rows"] if r["impl"] == "numpy")
        assert numpy_row["speedup_vs_numpy"] == 1.0
    assert any(t["what"].startswith("Adam float32 16") for t in res["targets"])
    assert all(t["means"] for t in res["targets"])


def test_cli_rejects_bad_arguments(capsys):
    assert bench.main(["--rules", "nosuchrule"]) == 2
    assert "nosuchrule" in capsys.readouterr().err
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
            if c.after:
                c.after()
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


# ----------------------------------------------------------------------------------
# What the numbers mean: ratios, ceilings, flags, notes
# ----------------------------------------------------------------------------------

def _fake_contenders(threads=(1, 2), torch_variants=("single-tensor", "fused")):
    def noop():
        pass
    cs = [bench.Contender("numpy", "", 1, noop)]
    cs += [bench.Contender("fastoptim", "", n, noop) for n in threads]
    cs += [bench.Contender("ceiling", "", n, noop) for n in sorted(set(threads) | {1})]
    cs += [bench.Contender("torch", v, max(threads), noop) for v in torch_variants]
    return cs


def test_every_ratio_is_the_ratio_of_the_medians_shown():
    cs = _fake_contenders()
    ms = 1e-3
    times = {   # per-repetition ratios disagree with the medians (what a user saw)
        "numpy::1": [500 * ms] * 5,
        "fastoptim::1": [60 * ms, 40 * ms, 52.23 * ms, 70 * ms, 50 * ms],
        "fastoptim::2": [30 * ms, 31 * ms, 32 * ms, 29 * ms, 33 * ms],
        "ceiling::1": [45 * ms, 48 * ms, 47 * ms, 46 * ms, 49 * ms],
        "ceiling::2": [28 * ms, 29 * ms, 27 * ms, 28 * ms, 30 * ms],
        "torch:single-tensor:2": [80 * ms] * 5,
        "torch:fused:2": [40 * ms, 70 * ms, 60.25 * ms, 61 * ms, 35 * ms],
    }
    rows = bench.summarize(cs, times, nbytes=28e6)
    by = {f"{r['impl']}:{r['variant']}:{r['threads']}": r for r in rows}
    med = {k: float(np.median(v)) for k, v in times.items()}
    fo1 = by["fastoptim::1"]
    assert fo1["time_s"] == med["fastoptim::1"] == 52.23 * ms
    assert by["torch:fused:2"]["time_s"] == 60.25 * ms
    # the old definition (median of per-repetition ratios) gave 0.86 here: < 1 while
    # the medians shown say fastoptim is faster
    old = float(np.median([a / b for a, b in zip(times["torch:fused:2"],
                                                 times["fastoptim::1"])]))
    assert old < 1
    assert fo1["speedup_vs_torch"] == pytest.approx(60.25 / 52.23, rel=1e-12)
    assert fo1["torch_reference"] == "fused"
    for r in rows:
        t = r["time_s"]
        assert r["speedup_vs_numpy"] == pytest.approx(med["numpy::1"] / t, rel=1e-12)
        assert r["speedup_vs_torch"] == pytest.approx(med["torch:fused:2"] / t, rel=1e-12)
        if r["impl"] != "ceiling":
            ceil = med[f"ceiling::{r['threads_used']}"]
            assert r["ceiling_time_s"] == ceil
            assert r["frac_ceiling"] == pytest.approx(ceil / t, rel=1e-12)
    assert by["torch:fused:2"]["speedup_vs_torch"] == 1.0
    no_frac = bench.summarize(cs, times, nbytes=448, fraction=False)
    assert all(r["frac_ceiling"] is None for r in no_frac if r["impl"] != "ceiling")


def _printed_row(out, label, thr):
    for line in out.splitlines():
        parts = line.split()
        if line.startswith(f"  {label} ") and parts[len(label.split())] == thr:
            return line
    raise AssertionError(f"no row {label!r} {thr!r} in\n{out}")


def test_printed_ratios_agree_with_the_printed_times(tmp_path, capsys):
    path = tmp_path / "out.json"
    assert bench.main(["--sizes", "4096", "--rules", "adam", "--threads", "1,2",
                       "--no-model", "--no-overhead", "--json", str(path)] + TINY) == 0
    out = capsys.readouterr().out
    assert "ratio of the medians" in out
    case = json.loads(path.read_text())["cases"][0]
    numpy_t = next(r["time_s"] for r in case["rows"] if r["impl"] == "numpy")
    torch_t = min((r["time_s"] for r in case["rows"] if r["impl"] == "torch"),
                  default=None)
    for r in case["rows"]:
        ceil_t = case["ceiling"][str(r["threads_used"])]["time_s"]
        if not r["ceiling_suspect"]:
            assert r["frac_ceiling"] == pytest.approx(ceil_t / r["time_s"], rel=1e-12)
        assert r["speedup_vs_numpy"] == pytest.approx(numpy_t / r["time_s"], rel=1e-12)
        if torch_t is not None:
            assert r["speedup_vs_torch"] == pytest.approx(torch_t / r["time_s"],
                                                          rel=1e-12)
        line = _printed_row(out, r["label"], bench._fmt_threads(r))
        assert f"{r['speedup_vs_numpy']:.2f}" in line.split()


def test_ceilings_are_paired_by_the_threads_really_used(tmp_path, monkeypatch):
    import fastoptim
    monkeypatch.setattr(bench.runner, "transformer_shapes",
                        lambda: [(300,), (8, 8), (5000,)])
    saved = fastoptim.get_serial_threshold()
    try:
        for threshold, fo2_used in ((0, 2), (2 ** 40, 1), (None, None)):
            fastoptim.set_serial_threshold(threshold)
            res = bench.run(["adam"], [2048], ["float32"], [1, 2],
                            bench.Profile(block_s=2e-4, case_s=0.01, min_reps=3,
                                          max_reps=3, pause_s=1e-4),
                            torch=None, model=True, overhead=False,
                            out=open(os.devnull, "w"))
            # the benchmark leaves the threshold as it found it
            assert fastoptim.get_serial_threshold() == (
                saved if threshold is None else threshold)
            assert [c["kind"] for c in res["cases"]] == ["sweep", "model"]
            for case in res["cases"]:
                assert sorted(case["ceiling"]) == ["1", "2"]
                for r in case["rows"]:
                    if r["impl"] == "numpy" or r["threads"] == 1:
                        assert r["threads_used"] == 1
                    if r["impl"] == "fastoptim" and r["threads"] == 2 and fo2_used:
                        assert r["threads_used"] == fo2_used, (threshold, r)
                    if r["impl"] == "fastoptim" and threshold is None:
                        expect = 2 if (r["threads"] == 2
                                       and case["size"] >= case["serial_threshold"]) else 1
                        assert r["threads_used"] == expect
                    assert r["ceiling_threads"] == r["threads_used"]
                    assert r["ceiling_time_s"] == \
                        case["ceiling"][str(r["threads_used"])]["time_s"]
    finally:
        fastoptim.set_serial_threshold(None)


def test_the_n_thread_ceiling_runs_an_n_thread_team():
    import fastoptim
    k = _config._kernels
    rule = bench.RULES["sgd"]
    arrays = bench.Arrays([(64,)], np.float32, rule.n_state)
    try:
        for user in (None, 12345):
            fastoptim.set_serial_threshold(user)
            found = k.get_serial_threshold()
            ceilings = {c.threads: c for c in bench.build_contenders(rule, arrays, [1, 2])
                        if c.impl == "ceiling"}
            assert ceilings[1].before is None       # one thread: no team to force
            ceilings[2].before()
            assert k.get_serial_threshold() == 0    # a team at every size
            ceilings[2].call()
            ceilings[2].after()
            assert k.get_serial_threshold() == found
            policy = bench.SerialPolicy()
            assert policy.user == user
            if user:
                assert policy.threads_used(rule, "float32", 20000, 2) == 2
                assert policy.threads_used(rule, "float32", 10000, 2) == 1
            assert policy.threads_used(rule, "float32", 1 << 30, 1) == 1
    finally:
        fastoptim.set_serial_threshold(None)


def _fake_measure(ceiling_factor, calls):
    """A stand-in for bench.measure: every contender takes 1 ms except the ceilings
    (``ceiling_factor(attempt)`` ms) and NumPy (10 ms)."""
    def measure(contenders, profile, progress=None):
        calls.append(len(contenders))
        f = ceiling_factor(len(calls))
        times = {c.key: [1e-3 * (f if c.impl == "ceiling" else 10 if c.impl == "numpy"
                                 else 1)] * 3 for c in contenders}
        return times, 3, {c.key: 1 for c in contenders}
    return measure


def test_a_row_above_its_ceiling_is_remeasured_then_flagged(tmp_path, monkeypatch,
                                                            capsys):
    calls = []
    monkeypatch.setattr(bench.cases, "measure", _fake_measure(lambda attempt: 1.37, calls))
    path = tmp_path / "out.json"
    assert bench.main(["--sizes", "1024", "--rules", "adam", "--threads", "1,2",
                       "--no-model", "--no-overhead", "--no-torch", "--json",
                       str(path)] + TINY) == 0
    out = capsys.readouterr().out
    assert len(calls) == 2                       # measured, then re-measured once
    case = json.loads(path.read_text())["cases"][0]
    assert case["remeasured"] and len(case["attempts"]) == 2
    fo = [r for r in case["rows"] if r["impl"] == "fastoptim"]
    assert fo
    for r in fo:
        assert r["ceiling_suspect"] is True
        assert r["frac_ceiling"] is None
        assert r["frac_ceiling_measured"] == pytest.approx(1.37)
        line = _printed_row(out, r["label"], bench._fmt_threads(r))
        assert "ceil?" in line and "1.37" not in line
    numpy_row = next(r for r in case["rows"] if r["impl"] == "numpy")
    assert not numpy_row["ceiling_suspect"]
    assert numpy_row["frac_ceiling"] == pytest.approx(0.137)
    flat = " ".join(out.split())                 # notes are wrapped
    assert "note: ceiling mis-measured" in flat
    assert flat.count("CEILING MIS-MEASURED") == 1
    summary = out[out.index("Summary"):]
    assert "ceil?" in summary and "1.37" not in summary.split("CEILING")[0]


def test_a_row_above_its_ceiling_once_is_remeasured_and_kept(tmp_path, monkeypatch,
                                                            capsys):
    calls = []
    monkeypatch.setattr(bench.cases, "measure",
                        _fake_measure(lambda attempt: 1.37 if attempt == 1 else 0.9,
                                      calls))
    path = tmp_path / "out.json"
    assert bench.main(["--sizes", "1024", "--rules", "sgd", "--threads", "1,2",
                       "--no-model", "--no-overhead", "--no-torch", "--json",
                       str(path)] + TINY) == 0
    out = capsys.readouterr().out
    assert len(calls) == 2
    case = json.loads(path.read_text())["cases"][0]
    assert case["remeasured"]
    assert case["attempts"][0]["above_ceiling"] and not case["attempts"][1]["above_ceiling"]
    for r in case["rows"]:
        assert not r["ceiling_suspect"]
        if r["impl"] == "fastoptim":
            assert r["frac_ceiling"] == pytest.approx(0.9)
    body = out.split(bench.LEGEND, 1)[1]        # the legend explains the markers
    assert "ceil?" not in body and "MIS-MEASURED" not in body
    assert "re-measured" in body


def test_no_remeasure_for_the_16_element_step(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(bench.cases, "measure", _fake_measure(lambda attempt: 1.37, calls))
    assert bench.main(["--sizes", "1024", "--rules", "sgd", "--threads", "1,2",
                       "--no-model", "--no-torch"] + TINY) == 0
    capsys.readouterr()
    assert len(calls) == 3       # sweep measured twice, the 16-element step once


def test_targets_only_when_asked(tmp_path, capsys):
    base = ["--sizes", "1024", "--rules", "adam", "--threads", "1,2", "--no-model",
            "--no-torch"] + TINY
    path = tmp_path / "out.json"
    assert bench.main(base + ["--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Targets" not in out and "SHORT" not in out and "goal" not in out
    assert json.loads(path.read_text())["targets"] is None
    assert bench.main(base + ["--targets", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Targets" in out
    targets = json.loads(path.read_text())["targets"]
    assert targets and out.count("means:") == len(targets)
    for t in targets:
        assert t["means"].startswith(t["what"])


def test_targets_say_what_they_mean():
    case = {"kind": "sweep", "rule": "adam", "title": "Adam", "dtype": "float32",
            "size": 1 << 25, "label": "", "disturbed": False, "ceiling": {},
            "rows": [{"impl": "fastoptim", "variant": "", "threads": 2,
                      "threads_used": 2, "frac_ceiling": 0.97, "time_s": 0.01,
                      "ceiling_suspect": False}]}
    small = dict(case, size=1 << 16,
                 rows=[dict(case["rows"][0], frac_ceiling=None, ceiling_suspect=True)])
    t_big, t_small = bench.check_targets([case, small])
    assert t_big["goal"] == 0.95 and t_big["met"] is True
    assert "memory bandwidth" in t_big["means"]
    assert t_big["what"] == "Adam float32 2^25 on 2 thr"
    assert t_small["goal"] == 0.7 and t_small["met"] is None    # no verdict
    text = bench.format_targets([t_big, t_small])
    assert "ok" in text and "ceiling mis-measured" in text and text.count("means:") == 2


def test_disturbed_cases_are_named_once_at_the_end(tmp_path, monkeypatch, capsys):
    loads = iter([0.8, 0.1] * 10)           # every other case disturbed
    monkeypatch.setattr(bench.OtherLoad, "cores", lambda self: next(loads))
    path = tmp_path / "out.json"
    assert bench.main(["--sizes", "512,1024", "--rules", "sgd,adam", "--threads", "1,2",
                       "--no-model", "--no-torch", "--json", str(path)] + TINY) == 0
    out = " ".join(capsys.readouterr().out.split())     # notes are wrapped
    assert out.count("DISTURBED RUN") == 1
    assert "cores busy during this case" not in out      # no per-case warnings
    note = out[out.index("DISTURBED RUN"):]
    assert "during 3 of 6 cases" in note
    assert out.count("(0.8 cores)") == 3 and "(0.1 cores)" not in out
    assert "rerun" in note and "unreliable" in note
    assert "--rules sgd --sizes 2^9,2^10 --dtypes float32" in note
    res = json.loads(path.read_text())
    assert [c["other_load_cores"] for c in res["cases"]] == [0.8, 0.1] * 3
    assert [c["disturbed"] for c in res["cases"]] == [True, False] * 3
    assert res["disturbed_cases"] == ["SGD float32 2^9", "SGD float32 2^10",
                                      "SGD float32 16 elem"]
    monkeypatch.setattr(bench.OtherLoad, "cores", lambda self: 0.1)
    assert bench.main(["--sizes", "512", "--rules", "sgd", "--threads", "1",
                       "--no-model", "--no-overhead", "--no-torch"] + TINY) == 0
    assert "DISTURBED" not in capsys.readouterr().out


def test_run_notes_stay_short():
    row = {"impl": "fastoptim", "variant": "", "label": "fastoptim", "threads": 2,
           "threads_used": 1, "ceiling_suspect": True}
    cases = [{"kind": "sweep", "rule": "adam", "title": "Adam", "dtype": "float32",
              "size": 1 << e, "label": "", "disturbed": True,
              "other_load_cores": 0.5 + e / 100, "rows": [row]} for e in range(10, 22)]
    busy, suspect = bench.run_notes(cases)
    assert busy.count("cores)") == 8 and "and 4 more" in busy
    assert "0.6-0.7 cores busy during 12 of 12 cases" in busy
    assert "fastoptim-bench --rules" not in busy     # all disturbed: rerun all
    assert "CEILING MIS-MEASURED in 12 rows" in suspect and "and 4 more" in suspect
    assert "fastoptim 2 thr (ran on 1)" in suspect


def test_header_names_the_machine_and_the_run_its_wall_time(capsys):
    assert bench.main(["--sizes", "512", "--rules", "sgd", "--threads", "1,2",
                       "--no-model", "--no-overhead", "--no-torch"] + TINY) == 0
    out = capsys.readouterr().out
    head = out[:out.index("How to read")]
    assert bench.cpu_model() in head
    assert f"kernel path {_config.config()['kernel_path']}" in head
    assert "threads 1,2" in head
    assert out.rstrip().splitlines()[-1].startswith("wall time ")
    assert bench.cpu_model()


def _plan(argv):
    return bench.parse_options(argv).plan()


def test_full_plans_the_whole_matrix(capsys):
    rules = list(bench.RULES)
    full = _plan(["--full"])
    sweep = [p for p in full if p[0] == "sweep"]
    assert {(r, d, n) for _, r, d, n in sweep} == {
        (r, d, 1 << e) for r in rules for d in ("float32", "float64")
        for e in (14, 18, 22, 25)}
    assert len(sweep) == len(rules) * 2 * 4
    assert [(k, r) for k, r, _, _ in full if k == "model"] == [("model", r) for r in rules]
    assert [(k, r, n) for k, r, _, n in full if k == "overhead"] == [
        ("overhead", r, 16) for r in rules]
    default = _plan([])
    assert {(r, d, n) for k, r, d, n in default if k == "sweep"} == {
        (r, "float32", n) for r in rules for n in (1 << 16, 1 << 24)}
    assert {k for k, *_ in default} == {"sweep", "model", "overhead"}
    assert len(default) < len(full)
    quick = _plan(["--quick"])
    assert [r for k, r, _, _ in quick if k == "model"] == ["adam"]
    assert bench.parse_options(["--quick"]).profile.case_s < \
        bench.parse_options([]).profile.case_s
    # explicit choices still narrow --full
    assert {n for k, _, _, n in _plan(["--full", "--sizes", "2^14"]) if k == "sweep"} == \
        {1 << 14}
    with pytest.raises(ValueError):
        bench.parse_options(["--full", "--quick"])
    assert bench.main(["--full", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"full run: {len(full)} cases")
    assert "float64 2^25" in out
