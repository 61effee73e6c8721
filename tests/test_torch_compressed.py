"""Compressed optimizer state in fastoptim.torch: bfloat16 and 8-bit blockwise state,
chosen per parameter group ("state_dtype"), equal bit for bit to the NumPy classes',
checkpointed as plain tensors, loaded without an upcast, converted between formats on
load, and imported from bitsandbytes' 8-bit optimizers."""
import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastoptim                                   # noqa: E402
import fastoptim.torch as fot                       # noqa: E402
from fastoptim import formats as FM                 # noqa: E402

RULES = {"SGD": dict(momentum=0.9, weight_decay=0.01),
         "Adagrad": dict(lr_decay=0.01, initial_accumulator_value=0.1),
         "RMSprop": dict(centered=True, momentum=0.5),
         "Adam": dict(weight_decay=0.1, amsgrad=True),
         "AdamW": dict(),
         "Adamax": dict(weight_decay=0.01),
         "Adadelta": dict(weight_decay=0.01, rho=0.5),
         "RAdam": dict(weight_decay=0.01, decoupled_weight_decay=True),
         "Rprop": dict(etas=(0.3, 1.5)),
         "NAdam": dict(weight_decay=0.01, momentum_decay=0.01),
         "ASGD": dict(t0=2.0, weight_decay=0.01),
         "Lion": dict(weight_decay=0.1),
         "ADOPT": dict(weight_decay=0.1, weight_decouple=True),
         "AdEMAMix": dict(weight_decay=0.1, t_alpha_beta3=4.0)}
SHAPES = [(64, 128), (10,), (300, 20), (7, 700)]


def _problem(steps, seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES]
             for _ in range(steps)]
    return params, grads


def _torch_opt(name, params, fmt, **extra):
    ps = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in params]
    group = {"params": ps, "state_dtype": fmt, **extra}
    return ps, getattr(fot, name)([group], lr=1e-2, **RULES[name])


def _step(ps, opt, grads):
    for p, g in zip(ps, grads):
        p.grad = torch.from_numpy(g.copy())
    opt.step()


@pytest.mark.parametrize("fmt", ["bfloat16", "8bit"])
@pytest.mark.parametrize("name", list(RULES))
def test_the_dropin_equals_the_numpy_class_bit_for_bit(name, fmt):
    params, grads = _problem(6)
    ps, opt = _torch_opt(name, params, fmt)
    arrays = [a.copy() for a in params]
    nopt = getattr(fastoptim, name)(arrays, lr=1e-2, state_dtype=fmt, **RULES[name])
    for g in grads:
        _step(ps, opt, g)
        nopt.step([x.copy() for x in g])
    for p, a in zip(ps, arrays):
        np.testing.assert_array_equal(p.detach().numpy(), a)
    nstate = nopt.state_dict()["state"]
    for i, p in enumerate(ps):
        for key, t in opt.state[p].items():
            if key == "step":
                assert float(t) == float(nstate[i]["step"])
                continue
            bits = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 \
                else t.numpy()
            np.testing.assert_array_equal(bits, nstate[i][key], err_msg=f"{i} {key}")
    # which parameters are compressed: all (bfloat16), those of >= 4096 values (8-bit)
    for p in ps:
        first = opt.state[p][fot.Adam._rule.state[0] if name.startswith("Adam")
                             else getattr(fot, name)._rule.state[0]]
        small = fmt == "8bit" and p.numel() < 4096
        want = torch.float32 if small else torch.bfloat16 if fmt == "bfloat16" else torch.uint8
        assert first.dtype == want


def test_min_8bit_size_is_a_group_key():
    params, grads = _problem(2)
    ps, opt = _torch_opt("Adam", params, "8bit", min_8bit_size=0)
    _step(ps, opt, grads[0])
    assert all(opt.state[p]["exp_avg"].dtype == torch.uint8 for p in ps)
    ps, opt = _torch_opt("Adam", params, "8bit", min_8bit_size=10 ** 6)
    _step(ps, opt, grads[0])
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in ps)


def test_8bit_state_takes_about_two_bytes_an_element():
    p = torch.nn.Parameter(torch.randn(1 << 16))
    opt = fot.Adam([{"params": [p], "state_dtype": "8bit"}])
    p.grad = torch.randn_like(p)
    opt.step()
    nbytes = sum(t.numel() * t.element_size() for k, t in opt.state[p].items() if k != "step")
    assert nbytes / p.numel() <= 2.1
    opt = fot.Adam([{"params": [p], "state_dtype": "bfloat16"}])
    opt.step()
    nbytes = sum(t.numel() * t.element_size() for k, t in opt.state[p].items() if k != "step")
    assert nbytes / p.numel() == 4


@pytest.mark.parametrize("fmt", ["bfloat16", "8bit"])
def test_a_checkpoint_resumes_exactly_and_stays_compressed(fmt):
    params, grads = _problem(8)
    ps, opt = _torch_opt("Adam", params, fmt)
    for g in grads[:4]:
        _step(ps, opt, g)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    sd = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = fot.Adam([{"params": ps2, "state_dtype": fmt}], lr=1e-2, **RULES["Adam"])
    opt2.load_state_dict(sd)
    want = torch.bfloat16 if fmt == "bfloat16" else torch.uint8
    assert opt2.state[ps2[0]]["exp_avg"].dtype == want          # not upcast by torch
    for g in grads[4:]:
        _step(ps, opt, g)
        _step(ps2, opt2, g)
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b)


def test_load_converts_to_the_optimizers_own_format():
    params, grads = _problem(3)
    ps, opt = _torch_opt("Adam", params, "8bit", min_8bit_size=0)
    for g in grads:
        _step(ps, opt, g)
    sd8 = opt.state_dict()
    # 8-bit -> float32: the dequantized values, exactly
    ps32 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    o32 = fot.Adam(ps32, lr=1e-2)
    o32.load_state_dict(copy.deepcopy(sd8))
    st, saved = o32.state[ps32[0]], sd8["state"][0]
    assert set(st) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    want = FM.dequantize_blockwise(saved["exp_avg"].numpy(), saved["exp_avg_absmax"].numpy())
    np.testing.assert_array_equal(st["exp_avg"].numpy(), want)
    # float32 -> bfloat16: rounded to nearest even, the group keeps its own state_dtype
    pb = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ob = fot.Adam([{"params": pb, "state_dtype": "bfloat16"}], lr=1e-2)
    ob.load_state_dict(o32.state_dict())
    assert ob.param_groups[0]["state_dtype"] == "bfloat16"
    assert torch.equal(ob.state[pb[0]]["exp_avg_sq"], st["exp_avg_sq"].to(torch.bfloat16))
    # bfloat16 -> 8-bit: quantized from the widened values
    p8 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    o8 = fot.Adam([{"params": p8, "state_dtype": "8bit", "min_8bit_size": 0}], lr=1e-2)
    o8.load_state_dict(ob.state_dict())
    codes, absmax = FM.quantize_blockwise(
        ob.state[pb[0]]["exp_avg"].float().numpy(), True)
    assert torch.equal(o8.state[p8[0]]["exp_avg"], torch.from_numpy(codes))
    assert torch.equal(o8.state[p8[0]]["exp_avg_absmax"], torch.from_numpy(absmax))


def test_transposed_parameters_keep_their_memory_order():
    # blocks are cut in the parameter's memory order: a Fortran-ordered (300, 40)
    # parameter steps as the C-ordered (40, 300) tensor with the same memory does
    p = torch.nn.Parameter(torch.randn(40, 300).t())
    q = torch.nn.Parameter(p.detach().t().contiguous())
    opt = fot.Adam([{"params": [p], "state_dtype": "8bit"}])
    ref = fot.Adam([{"params": [q], "state_dtype": "8bit"}])
    assert not p.is_contiguous()
    for _ in range(3):
        g = torch.randn(40, 300)
        p.grad, q.grad = g.t(), g.clone()
        opt.step()
        ref.step()
    assert torch.equal(p.detach().t(), q.detach())
    assert opt.state[p]["exp_avg"].stride() == p.stride()
    assert torch.equal(opt.state[p]["exp_avg_absmax"], ref.state[q]["exp_avg_absmax"])


def test_bad_compressed_settings_are_refused():
    p = torch.nn.Parameter(torch.randn(5000))
    with pytest.raises(ValueError, match="state_dtype"):
        fot.Adam([{"params": [p], "state_dtype": "float16"}])
    with pytest.raises(ValueError, match="rounding"):
        fot.Adam([{"params": [p], "state_dtype": "bfloat16", "rounding": "up"}])
    with pytest.raises(ValueError, match="min_8bit_size"):
        fot.Adam([{"params": [p], "state_dtype": "8bit", "min_8bit_size": -1}])
    with pytest.raises(TypeError, match="min_8bit_size"):
        fot.Adam([{"params": [p], "state_dtype": "8bit", "min_8bit_size": 1.5}])
    with pytest.raises(TypeError, match="float32"):
        fot.Adam([{"params": [torch.nn.Parameter(torch.randn(3, dtype=torch.float64))],
                   "state_dtype": "bfloat16"}])
    opt = fot.Adam([p])
    with pytest.raises(ValueError, match="state_dtype"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))],
                             "state_dtype": "4bit"})
    assert len(opt.param_groups) == 1


def test_a_refused_step_changes_nothing():
    params, grads = _problem(2)
    ps, opt = _torch_opt("Adam", params, "8bit")
    _step(ps, opt, grads[0])
    before = [p.detach().clone() for p in ps]
    state = copy.deepcopy({i: dict(opt.state[p]) for i, p in enumerate(ps)})
    for p, g in zip(ps, grads[1]):
        p.grad = torch.from_numpy(g.copy())
    opt.state[ps[2]]["exp_avg_absmax"] = torch.zeros(3)          # wrong count of scales
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        opt.step()
    opt.state[ps[2]]["exp_avg_absmax"] = state[2]["exp_avg_absmax"].clone()
    for p, b in zip(ps, before):
        assert torch.equal(p.detach(), b)
    for i, p in enumerate(ps):
        for k, t in opt.state[p].items():
            assert torch.equal(t, state[i][k]), (i, k)


# --- bitsandbytes' 8-bit optimizers ----------------------------------------------------

def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        pytest.skip("bitsandbytes is not installed (pip install bitsandbytes==0.50.2: "
                    "the test extras install it on Linux x86-64)")
    return bitsandbytes


def _bnb_run(cls_name, weight_decay, steps, gen):
    bnb = _bnb()
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((64, 128), (10,))]
    opt = getattr(bnb.optim, cls_name)(ps, lr=1e-3, weight_decay=weight_decay)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("cls_name", ["Adam8bit", "AdamW8bit"])
def test_a_bitsandbytes_state_dict_loads_and_training_continues(cls_name):
    gen = torch.Generator().manual_seed(5)
    ps, b = _bnb_run(cls_name, 0.0, 5, gen)
    sd = copy.deepcopy(b.state_dict())
    mine = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = fot.AdamW([{"params": mine, "state_dtype": "8bit"}], lr=1e-3, weight_decay=0.0,
                    amsgrad=False, maximize=False)
    opt.load_state_dict(sd)
    inner = sd["state"][0]["__bnb_optimizer_quant_state__"]
    st = opt.state[mine[0]]
    assert torch.equal(st["exp_avg"], inner["state1"])                # codes as they are
    assert torch.equal(st["exp_avg_sq"], inner["state2"])
    assert torch.equal(st["exp_avg_absmax"], inner["absmax1"])
    assert torch.equal(st["exp_avg_sq_absmax"], inner["absmax2"])
    assert float(st["step"]) == 5
    small = sd["state"][1]["__bnb_optimizer_quant_state__"]           # under 4096: float32
    assert torch.equal(opt.state[mine[1]]["exp_avg"], small["state1"])
    group = opt.param_groups[0]
    assert group["state_dtype"] == "8bit" and group["decoupled_weight_decay"] is True
    assert not {"alpha", "t_alpha", "t_beta3"} & set(group)
    # both go on: close to each other, as close as bitsandbytes stays to float32 state
    wide = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ref = torch.optim.AdamW(wide, lr=1e-3, weight_decay=0.0)
    ref.load_state_dict(_dequantized(sd, 2))
    for _ in range(50):
        g = [torch.randn(p.shape, generator=gen) for p in ps]
        for group in (ps, mine, wide):
            for p, x in zip(group, g):
                p.grad = x.clone()
        b.step()
        opt.step()
        ref.step()
    moved = (wide[0] - mine[0]).abs().max().item()
    gap_bnb = (ps[0] - wide[0]).norm().item()
    gap_mine = (mine[0] - wide[0]).norm().item()
    assert gap_mine <= 1.5 * gap_bnb, (gap_mine, gap_bnb, moved)


def _dequantized(bnb_sd, nparams):
    """A bitsandbytes Adam state dict as torch.optim.Adam's (float32 state)."""
    state = {}
    for k in range(nparams):
        entry = bnb_sd["state"][k]
        inner = entry["__bnb_optimizer_quant_state__"]
        out = {"step": torch.tensor(float(entry["step"]))}
        for code, name, signed in (("state1", "exp_avg", True), ("state2", "exp_avg_sq", False)):
            t = inner[code]
            if t.dtype == torch.uint8:
                t = torch.from_numpy(FM.dequantize_blockwise(
                    t.numpy(), inner["absmax" + code[-1]].numpy(), signed))
            out[name] = t.clone()
        state[k] = out
    groups = [{k: v for k, v in g.items() if k in ("lr", "betas", "eps", "weight_decay",
                                                   "params")}
              for g in bnb_sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def test_bitsandbytes_adam8bit_with_weight_decay_into_adam_keeps_adams_l2_decay():
    # bitsandbytes' Adam8bit decays weights decoupled on the CPU (as AdamW); loaded into
    # fastoptim.torch.Adam, the state is taken as it is and the steps that follow are
    # Adam's (weight decay added to the gradient, as torch.optim.Adam): the same steps as
    # fastoptim.torch.Adam from that state, which AdamW (bitsandbytes' rule) does not take
    gen = torch.Generator().manual_seed(9)
    ps, b = _bnb_run("Adam8bit", 0.1, 3, gen)
    sd = copy.deepcopy(b.state_dict())
    g = [torch.randn(p.shape, generator=gen) for p in ps]
    after = {}
    for cls in (fot.Adam, fot.AdamW):
        mine = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        opt = cls([{"params": mine, "state_dtype": "8bit"}], lr=1e-3, weight_decay=0.1)
        opt.load_state_dict(copy.deepcopy(sd))
        assert opt.param_groups[0]["decoupled_weight_decay"] is (cls is fot.AdamW)
        for p, x in zip(mine, g):
            p.grad = x.clone()
        opt.step()
        after[cls] = mine[0].detach().clone()
    # the Adam step from the imported state, through the NumPy reference
    from fastoptim import reference as R
    inner = sd["state"][0]["__bnb_optimizer_quant_state__"]
    p = ps[0].detach().numpy().copy()
    codes = [inner["state1"].numpy().copy(), inner["state2"].numpy().copy()]
    scales = [inner["absmax1"].numpy().copy(), inner["absmax2"].numpy().copy()]
    R.adam_([p], [g[0].numpy()], [codes[0]], [codes[1]], None, np.array([3]), lr=1e-3,
            weight_decay=0.1, state_dtype="8bit", absmaxes=[[scales[0]], [scales[1]], None])
    np.testing.assert_array_equal(after[fot.Adam].numpy(), p)
    assert not torch.equal(after[fot.Adam], after[fot.AdamW])


def test_a_bitsandbytes_state_dict_with_another_map_is_refused():
    gen = torch.Generator().manual_seed(1)
    ps, b = _bnb_run("AdamW8bit", 0.0, 1, gen)
    sd = copy.deepcopy(b.state_dict())
    sd["state"][0]["__bnb_optimizer_quant_state__"]["qmap1"] = torch.linspace(-1, 1, 256)
    opt = fot.AdamW([{"params": [torch.nn.Parameter(p.detach().clone()) for p in ps],
                      "state_dtype": "8bit"}])
    with pytest.raises(ValueError, match="qmap1"):
        opt.load_state_dict(sd)


def _fastoptim_8bit_run(steps=3):
    gen = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen))
          for s in ((64, 128), (10,), (33, 300))]
    opt = fot.AdamW([{"params": ps, "state_dtype": "8bit"}], lr=1e-3, weight_decay=0.01)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return ps, opt


def test_to_bitsandbytes_loads_into_adamw8bit_and_comes_back():
    bnb = _bnb()
    ps, opt = _fastoptim_8bit_run()
    sd = opt.state_dict()
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    b = bnb.optim.AdamW8bit(theirs, lr=1e-3, weight_decay=0.01)
    b.load_state_dict(fot.to_bitsandbytes(sd))
    st = b.state[theirs[0]]
    assert torch.equal(st["state1"], sd["state"][0]["exp_avg"])
    assert torch.equal(st["absmax2"], sd["state"][0]["exp_avg_sq_absmax"])
    assert st["step"] == 3
    small = b.state[theirs[1]]["state1"]                             # float32 state
    assert small.dtype == torch.float32 and torch.equal(small, sd["state"][1]["exp_avg"])
    for p in theirs:
        p.grad = torch.ones_like(p)
    b.step()                                                         # it trains on
    mine = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    back = fot.AdamW([{"params": mine, "state_dtype": "8bit"}], lr=1e-3, weight_decay=0.01)
    back.load_state_dict(fot.to_bitsandbytes(sd))
    for key in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"):
        assert torch.equal(back.state[mine[0]][key], sd["state"][0][key])
    # (33, 300): 8-bit here; a round trip keeps its codes
    assert torch.equal(back.state[mine[2]]["exp_avg"], sd["state"][2]["exp_avg"])


def test_to_torchao_loads_into_adamw8bit_and_comes_back():
    try:
        from torchao.optim import AdamW8bit
    except ImportError:
        pytest.skip("torchao is not installed (pip install torchao==0.18.0: the test "
                    "extras install it on Linux x86-64)")
    ps, opt = _fastoptim_8bit_run()
    sd = opt.state_dict()
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    a = AdamW8bit(theirs, lr=1e-3, weight_decay=0.01)
    a.load_state_dict(fot.to_torchao(sd))
    st = a.state[theirs[0]]
    assert type(st["exp_avg"]).__name__ == "OptimState8bit"
    assert torch.equal(st["exp_avg"].codes, sd["state"][0]["exp_avg"])
    assert torch.equal(st["exp_avg_sq"].scale, sd["state"][0]["exp_avg_sq_absmax"])
    # 33 x 300 is not whole blocks, which torchao's format needs: float32, dequantized
    wide = a.state[theirs[2]]["exp_avg"]
    want = FM.dequantize_blockwise(sd["state"][2]["exp_avg"].numpy(),
                                   sd["state"][2]["exp_avg_absmax"].numpy())
    np.testing.assert_array_equal(wide.numpy(), want)
    mine = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    back = fot.AdamW([{"params": mine, "state_dtype": "8bit"}], lr=1e-3, weight_decay=0.01)
    back.load_state_dict(a.state_dict())
    for key in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"):
        assert torch.equal(back.state[mine[0]][key], sd["state"][0][key])
    assert back.param_groups[0]["decoupled_weight_decay"] is True
    for p in mine:
        p.grad = torch.ones_like(p)
    back.step()                                          # (a tensor lr, as torchao's)


def test_conversions_refuse_what_the_other_formats_cannot_hold():
    p = torch.nn.Parameter(torch.randn(5000))
    opt = fot.Adam([{"params": [p], "state_dtype": "8bit"}], amsgrad=True)
    p.grad = torch.randn_like(p)
    opt.step()
    with pytest.raises(ValueError, match="amsgrad"):
        fot.to_bitsandbytes(opt.state_dict())
    with pytest.raises(TypeError, match="state_dict"):
        fot.to_torchao([1, 2])


def _tiny_lm_losses(fmt, steps=200):
    """A 2-layer causal TransformerEncoder language model learning in-context linear
    congruential sequences, trained with fastoptim.torch.AdamW; its losses per step."""
    torch.manual_seed(0)
    vocab, d, T, B = 64, 64, 32, 16
    layer = torch.nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
    model = torch.nn.ModuleDict(dict(
        emb=torch.nn.Embedding(vocab, d), out=torch.nn.Linear(d, vocab),
        enc=torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)))
    group = {"params": list(model.parameters())}
    if fmt is not None:
        group["state_dtype"] = fmt
    opt = fot.AdamW([group], lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(T)
    losses = []
    for _ in range(steps):
        a = torch.randint(1, 8, (B, 1), generator=gen)
        b = torch.randint(0, vocab, (B, 1), generator=gen)
        seq = [torch.randint(0, vocab, (B, 1), generator=gen)]
        for _ in range(T):
            seq.append((a * seq[-1] + b) % vocab)
        seq = torch.cat(seq, 1)
        h = model["enc"](model["emb"](seq[:, :-1]), mask=mask, is_causal=True)
        loss = torch.nn.functional.cross_entropy(model["out"](h).reshape(-1, vocab),
                                                 seq[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return np.array(losses), opt


def test_a_small_language_model_learns_as_well_with_compressed_state():
    # the loss curves with 8-bit and bfloat16 state follow float32 state's: 20-step
    # means within 1% all along (measured: 0.12% and 0.06%; float32 Adam with beta2 0.9
    # instead of 0.999 is 1.3% off, without momentum 3.9%); the 8-bit run kept 8-bit state
    curves = {}
    for fmt in (None, "8bit", "bfloat16"):
        losses, opt = _tiny_lm_losses(fmt)
        curves[fmt] = np.convolve(losses, np.ones(20) / 20, mode="valid")
        if fmt == "8bit":
            assert any(t.dtype == torch.uint8 for st in opt.state.values()
                       for t in st.values())
    assert curves[None][-1] < 0.7 * curves[None][0]                 # it learns
    for fmt in ("8bit", "bfloat16"):
        gap = np.max(np.abs(curves[fmt] - curves[None]) / curves[None])
        assert gap < 0.01, (fmt, gap)
