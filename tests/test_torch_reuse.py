"""fastoptim.torch keeps each group's prepared kernel call between steps and only points
it at the new gradients: every change it depends on must be seen, never a stale
pointer. Each test runs torch.optim (default path) and fastoptim.torch side by side,
applies the same change to both between steps, and compares every parameter and state
tensor after each step."""
import copy

import pytest

torch = pytest.importorskip("torch")

import fastoptim.torch as fot  # noqa: E402

from test_torch_dropin import NAMES, RICH, assert_close  # noqa: E402


def _model(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype))
            for s in [(7, 5), (5,), (3, 4, 2), (33,)]]


class Twins:
    """torch.optim.<name> and fastoptim.torch.<name> on equal copies of a model."""

    def __init__(self, name, opts=None, dtype=torch.float32, groups=None):
        self.name = name
        self.opts = dict(RICH[name] if opts is None else opts)
        self.ref = _model(dtype)
        self.got = [torch.nn.Parameter(p.detach().clone()) for p in self.ref]
        self.gen = torch.Generator().manual_seed(1)
        split = groups or (lambda ps: ps)
        self.ref_opt = getattr(torch.optim, name)(split(self.ref), **self.opts)
        self.got_opt = getattr(fot, name)(split(self.got), **self.opts)

    def grads(self, skip=()):
        for i, (a, b) in enumerate(zip(self.ref, self.got)):
            if i in skip:
                a.grad = b.grad = None
                continue
            g = torch.randn(a.shape, generator=self.gen, dtype=a.dtype)
            a.grad, b.grad = g.clone(), g.clone()

    def step(self, n=1, skip=()):
        for _ in range(n):
            self.grads(skip)
            self.ref_opt.step()
            self.got_opt.step()
            self.check()

    def both(self, fn):
        fn(self.ref, self.ref_opt)
        fn(self.got, self.got_opt)

    def check(self):
        for i, (a, b) in enumerate(zip(self.ref, self.got)):
            assert_close(b, a, f"{self.name} param {i}")
            sa, sb = self.ref_opt.state.get(a, {}), self.got_opt.state.get(b, {})
            assert sorted(sa) == sorted(sb), (sa.keys(), sb.keys())
            for key in sa:
                if isinstance(sa[key], torch.Tensor):
                    assert_close(sb[key].to(sa[key].dtype), sa[key], f"param {i} {key}")


def test_the_group_is_kept_and_reused():
    """The second step onwards runs the kept call (this is what the other tests change)."""
    t = Twins("Adam")
    t.step(2)
    kept = t.got_opt._reuses[0]
    t.step(3)
    assert t.got_opt._reuses[0] is kept


@pytest.mark.parametrize("name", NAMES)
def test_parameter_data_replaced_between_steps(name):
    t = Twins(name)
    t.step(3)

    def swap(params, opt):
        params[0].data = params[0].data.clone()         # same values, new memory
        params[2].data = params[2].data * 1.5
    t.both(swap)
    t.step(3)


def test_parameter_data_transposed_in_place_of_itself():
    """Same address and shape, other strides: the update must follow the new layout."""
    t = Twins("Adam")
    square = [torch.nn.Parameter(torch.randn(6, 6, generator=torch.Generator().manual_seed(3)))
              for _ in range(2)]
    t.ref.append(square[0])
    t.got.append(square[1])
    square[1].data.copy_(square[0].data)
    t.ref_opt.add_param_group({"params": [square[0]]})
    t.got_opt.add_param_group({"params": [square[1]]})
    t.step(2)
    t.both(lambda ps, opt: setattr(ps[-1], "data", ps[-1].data.t()))
    t.step(3)


@pytest.mark.parametrize("name", NAMES)
def test_dtype_changed_between_steps(name):
    """float64 -> float32 (the other way the float32 rounding differences would be
    compared at float64's tolerance)."""
    t = Twins(name, dtype=torch.float64)
    t.step(2)

    def to_float(params, opt):
        for p in params:
            p.data = p.data.float()
        for st in opt.state.values():
            for k, v in list(st.items()):
                if isinstance(v, torch.Tensor) and k != "step":
                    st[k] = v.float()
    t.both(to_float)
    t.step(3)


@pytest.mark.parametrize("name", NAMES)
def test_param_group_added_between_steps(name):
    t = Twins(name)
    t.step(2)
    extra = _model(seed=5)[:2]
    t.ref.extend(extra)
    t.got.extend(torch.nn.Parameter(p.detach().clone()) for p in extra)
    t.ref_opt.add_param_group({"params": extra, "lr": 0.003})
    t.got_opt.add_param_group({"params": t.got[-2:], "lr": 0.003})
    t.step(3)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_loaded_between_steps(name):
    t = Twins(name)
    t.step(3)
    saved = copy.deepcopy(t.ref_opt.state_dict())
    t.step(2)
    t.ref_opt.load_state_dict(copy.deepcopy(saved))   # (load_state_dict keeps the
    t.got_opt.load_state_dict(copy.deepcopy(saved))   # given tensors: one copy each)
    t.step(3)


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_zero_grad_either_way(name, set_to_none):
    t = Twins(name)
    for _ in range(4):
        t.ref_opt.zero_grad(set_to_none=set_to_none)
        t.got_opt.zero_grad(set_to_none=set_to_none)
        for a, b in zip(t.ref, t.got):                 # accumulate into .grad, as backward
            g = torch.randn(a.shape, generator=t.gen)
            if a.grad is None:
                a.grad, b.grad = g.clone(), g.clone()
            else:
                a.grad.add_(g)
                b.grad.add_(g)
        t.ref_opt.step()
        t.got_opt.step()
        t.check()


@pytest.mark.parametrize("name", NAMES)
def test_a_parameter_without_gradient_then_with_one(name):
    t = Twins(name)
    t.step(2, skip={1})
    t.step(2)
    t.step(2, skip={0, 3})


@pytest.mark.parametrize("name", ["SGD", "RMSprop", "Adam"])
def test_state_tensor_replaced_between_steps(name):
    t = Twins(name)
    t.step(2)

    def replace(params, opt):
        st = opt.state[params[0]]
        key = next(k for k in st if k != "step")
        st[key] = st[key].clone()                      # another tensor object
    t.both(replace)
    t.step(3)


@pytest.mark.parametrize("what", ["state", "step"])
@pytest.mark.parametrize("name", ["SGD", "RMSprop", "Adam"])
def test_state_tensor_moved_between_steps(name, what):
    """The same tensor object, its memory moved (share_memory_, set_)."""
    if name == "SGD" and what == "step":
        pytest.skip("SGD keeps no step")
    t = Twins(name)
    t.step(2)

    def move(params, opt):
        st = opt.state[params[1]]
        for k in st:
            if (k == "step") == (what == "step"):
                st[k].share_memory_()
        opt.state[params[2]]["step" if what == "step" else next(iter(
            k for k in st if k != "step"))].set_(
            opt.state[params[2]]["step" if what == "step" else next(iter(
                k for k in st if k != "step"))].clone())
    t.both(move)
    t.step(3)


def test_state_cleared_between_steps():
    t = Twins("Adam")
    t.step(2)
    t.both(lambda ps, opt: opt.state.clear())
    t.step(2)


@pytest.mark.parametrize("name", ["Adagrad", "Adam", "AdamW"])
def test_step_counter_edited_in_place(name):
    t = Twins(name)
    t.step(2)

    def edit(params, opt):
        opt.state[params[0]]["step"].fill_(100.0)
    t.both(edit)
    t.step(2)


@pytest.mark.parametrize("name", NAMES)
def test_options_changed_between_steps(name):
    t = Twins(name)
    t.step(2)

    def change(params, opt):
        g = opt.param_groups[0]
        g["lr"] *= 0.3
        g["weight_decay"] = 0.02
        g["maximize"] = True
        if "betas" in g:
            g["betas"] = (0.5, 0.9)
        if name in ("SGD", "RMSprop"):
            g["momentum"] = 0.3
    t.both(change)
    t.step(3)


def test_tensor_lr_changed_in_place_between_steps():
    t = Twins("Adam", dict(lr=torch.tensor(0.01)))
    t.step(2)
    t.both(lambda ps, opt: opt.param_groups[0]["lr"].fill_(0.002))
    t.step(2)


def test_option_that_adds_state_between_steps():
    """momentum 0 -> 0.5 adds a momentum buffer: a new kernel call, not the kept one."""
    t = Twins("SGD", dict(lr=0.05))
    t.step(2)
    t.both(lambda ps, opt: opt.param_groups[0].update(momentum=0.5))
    t.step(3)


def test_gradient_in_another_layout_between_steps():
    t = Twins("Adam")
    t.step(2)
    g = torch.randn(5, 7, generator=t.gen).t()                # (7, 5), Fortran order
    t.ref[0].grad, t.got[0].grad = g.clone(), g.clone()
    for a, b in zip(t.ref[1:], t.got[1:]):
        x = torch.randn(a.shape, generator=t.gen)
        a.grad, b.grad = x.clone(), x.clone()
    t.ref_opt.step()
    t.got_opt.step()
    t.check()
    t.step(2)


def test_a_refused_step_after_reuse_changes_nothing_and_names_the_parameter():
    t = Twins("Adam")
    t.step(3)
    before = [p.detach().clone() for p in t.got]
    state = copy.deepcopy(t.got_opt.state_dict())
    t.grads()
    t.got[2].grad = t.got[2].grad.to_sparse()    # the kernels take dense gradients only
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[2\] has a "
                                        r"sparse gradient"):
        t.got_opt.step()
    for a, b in zip(before, t.got):
        assert torch.equal(a, b)
    after = t.got_opt.state_dict()
    for k, entry in state["state"].items():
        for key, v in entry.items():
            assert torch.equal(v, after["state"][k][key])
    t.ref_opt.zero_grad()
    t.step(2)                                    # and the next good steps go on as torch


def test_a_gradient_overlapping_a_state_tensor_is_refused_after_reuse():
    t = Twins("Adam")
    t.step(2)
    t.grads()
    t.got[1].grad = t.got_opt.state[t.got[1]]["exp_avg"]
    with pytest.raises(ValueError, match="overlaps"):
        t.got_opt.step()


def test_hooks_still_run_with_the_light_step_wrapper():
    t = Twins("Adam")
    calls = []
    h1 = t.got_opt.register_step_pre_hook(lambda opt, a, k: calls.append("pre"))
    h2 = t.got_opt.register_step_post_hook(lambda opt, a, k: calls.append("post"))
    t.step(2)
    assert calls == ["pre", "post"] * 2
    h1.remove()
    h2.remove()
    t.step(1)
    assert calls == ["pre", "post"] * 2
    with torch.autograd.profiler.profile() as prof:
        t.step(1)
    assert any("Optimizer.step#Adam.step" in e.name for e in prof.function_events)


def test_gradient_dtype_changed_in_place_is_refused_as_a_fresh_plan_refuses_it():
    """``p.grad.data = ...`` bypasses the grad setter's dtype check; a kept step must
    not read a float64 buffer as float32 but refuse the step as a fresh plan does."""
    t = Twins("Adam")
    t.step(2)
    before = [p.detach().clone() for p in t.got]
    t.grads()
    t.got[1].grad.data = t.got[1].grad.data.double()
    with pytest.raises((TypeError, ValueError), match=r"\['params'\]\[1\]"):
        t.got_opt.step()
    for a, b in zip(before, t.got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_kept_steps_without_torchs_address_reader(name, monkeypatch):
    """The kept step reads tensor addresses through torch's C reader when it has one,
    else through ``data_ptr()``: both paths follow torch, and see a swapped ``.data``."""
    monkeypatch.setattr(fot._probes, "_READER", 0)
    t = Twins(name)
    t.step(3)
    t.both(lambda ps, opt: setattr(ps[0], "data", ps[0].data.clone()))
    t.step(2)


@pytest.mark.parametrize("change", ["transposed", "dtype", "shape", "sparse"])
@pytest.mark.parametrize("guard", ["torch's", "python"])
def test_kept_steps_see_layout_changes_with_either_check(guard, change, monkeypatch):
    """The kept step checks parameters' and gradients' type, dtype, shape and strides with
    torch's compiled tensor check where it has one, else by reading them from Python:
    either way a changed layout plans the group afresh (which follows torch, or refuses
    as a fresh plan does, changing nothing)."""
    if guard == "python":
        monkeypatch.setattr(fot._probes, "_LAYOUT_GUARD", None)
    elif fot._LAYOUT_GUARD is None:
        pytest.skip("this torch has no compiled tensor check (Python reads are used)")
    t = Twins("Adam")
    t.step(2)
    assert (t.got_opt._reuses[0].layout is None) == (guard == "python")
    if change == "transposed":
        t.grads()
        for ps in (t.ref, t.got):
            ps[0].grad = ps[0].grad.t().contiguous().t()       # same values, F order
        t.ref_opt.step()
        t.got_opt.step()
        t.check()
        t.step(2)
        return
    t.grads()
    if change == "shape":           # (its state no longer fits: torch.optim refuses too)
        t.got[3].grad = None
        t.got[3].data = t.got[3].data[:20].clone()
        t.got[3].grad = torch.ones(20)
    elif change == "dtype":
        t.got[2].grad.data = t.got[2].grad.data.double()
    else:
        t.got[2].grad = t.got[2].grad.to_sparse()
    before = [p.detach().clone() for p in t.got]
    with pytest.raises((TypeError, ValueError),
                       match=r"\['params'\]\[%d\]" % (3 if change == "shape" else 2)):
        t.got_opt.step()
    for a, b in zip(before, t.got):
        assert torch.equal(a, b)


def test_torchs_address_reader_agrees_with_data_ptr():
    from fastoptim import _config
    k = _config._kernels
    if fot._READER == 0:
        pytest.skip("this torch has no C data-address reader (data_ptr() is used)")
    base = torch.arange(60.0)
    objs = [base, base[7:], base.view(6, 10).t(), base[:0], torch.tensor(2.0),
            torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64)),
            torch.zeros(5, dtype=torch.complex128), torch.ones(4).share_memory_()]
    want = [t.data_ptr() for t in objs]
    assert k.addresses(objs, fot._READER, fot._EXACT).tolist() == want
    assert k.addresses(objs).tolist() == want
    assert k.addresses_equal(objs, k.addresses(objs), fot._READER, fot._EXACT)
    moved = k.addresses(objs)
    moved[3] += 8
    assert not k.addresses_equal(objs, moved, fot._READER, fot._EXACT)


def test_address_helpers_check_their_arguments():
    import numpy as np
    from fastoptim import _config
    k = _config._kernels
    ts = [torch.zeros(3), torch.zeros(2)]
    with pytest.raises(TypeError, match="int64"):
        k.addresses_equal(ts, np.zeros(2, dtype=np.int32))
    with pytest.raises(TypeError, match="int64"):
        k.addresses_equal(ts, np.zeros(3, dtype=np.int64))
    assert not k.addresses_equal(ts, np.zeros(2, dtype=np.int64))
    d = {"a": ts[0]}
    assert k.entries_are([d, d], ["a", "a"], [ts[0], ts[0]])
    assert not k.entries_are([d], ["a"], [ts[1]])
    assert not k.entries_are([d], ["b"], [ts[0]])
    assert not k.entries_are([[1]], ["a"], [ts[0]])
    with pytest.raises(ValueError, match="one length"):
        k.entries_are([d], ["a", "b"], [ts[0]])
    ps = [torch.zeros(2), torch.zeros(3), torch.zeros(1)]
    ps[0].grad, ps[2].grad = torch.ones(2), torch.ones(1)
    got = k.kept_grads(ps, list(ps), [True, False, True])
    assert len(got) == 2 and got[0] is ps[0].grad and got[1] is ps[2].grad
    assert k.kept_grads(ps, list(ps), [True, True, True]) is None      # a grad missing
    assert k.kept_grads(ps, list(ps), [False, False, True]) is None    # one too many
    assert k.kept_grads(ps, [ps[0], torch.zeros(3), ps[2]], [True, False, True]) is None
    assert k.kept_grads(ps, ps[:2], [True, False]) is None             # lengths differ
    assert k.kept_grads([], [], []) == []


def test_a_kept_step_records_nothing_and_leaves_grad_mode_as_it_was():
    """The kept step runs outside torch.no_grad() (see _Optimizer._step): it must still
    leave the parameters leaves with no history, in either grad mode, and keep the mode."""
    t = Twins("Adam")
    t.step(2)
    kept = t.got_opt._reuses[0]
    for mode in (True, False, True):
        with torch.set_grad_enabled(mode):
            t.step()
            assert torch.is_grad_enabled() is mode
        assert t.got_opt._reuses[0] is kept
        for p in t.got:
            assert p.is_leaf and p.grad_fn is None and p.requires_grad
    loss = (t.got[0] * 2).sum()            # still usable in a graph
    loss.backward()


# --- kept steps of the rules with more than per-element state ------------------------
# NAdam's and ASGD's per-parameter scalars, the group step counts of the oracle rules,
# compressed state (bfloat16, 8-bit codes and their block scales). Each test runs two
# fastoptim.torch optimizers on equal models, one kept between steps as always, one
# planned afresh at every step (the path that checks everything): they must agree to
# the bit after every step, whatever changes between steps.

def _state_options(fmt):
    return {} if fmt is None else {"state_dtype": fmt, "min_8bit_size": 16,
                                   **({"rounding": "stochastic"} if fmt == "bf16s" else {})}


class KeptAndPlanned:
    """fastoptim.torch.<name> twice on equal models: ``kept`` keeps its groups' kernel
    calls, ``planned`` never does."""

    def __init__(self, name, opts=None, fmt=None):
        self.name = name
        cls = getattr(fot, name)
        self.models = [_model(), _model()]
        if fmt == "bf16s":
            fmt_opts = {"state_dtype": "bfloat16", "rounding": "stochastic"}
        else:
            fmt_opts = _state_options(fmt)
        self.opts = [cls([dict(params=m, **fmt_opts)], **(opts or {})) for m in self.models]
        self.kept, self.planned = self.opts
        self.planned._keep = lambda *args: None
        self.gen = torch.Generator().manual_seed(2)
        for o in self.opts:
            if hasattr(o, "train"):
                o.train()

    def step(self, n=1):
        for _ in range(n):
            for a, b in zip(*self.models):
                g = torch.randn(a.shape, generator=self.gen)
                a.grad, b.grad = g.clone(), g.clone()
            for o in self.opts:
                o.step()
            self.check()

    def both(self, fn):
        for m, o in zip(self.models, self.opts):
            fn(m, o)

    def check(self):
        for i, (a, b) in enumerate(zip(*self.models)):
            assert torch.equal(a, b), f"{self.name} param {i}"
            sa, sb = self.kept.state[a], self.planned.state[b]
            assert sorted(sa) == sorted(sb)
            for k in sa:
                if isinstance(sa[k], torch.Tensor):
                    assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), \
                        f"{self.name} param {i} {k}"
        for ga, gb in zip(self.kept.param_groups, self.planned.param_groups):
            assert {k: v for k, v in ga.items() if k != "params"} == \
                {k: v for k, v in gb.items() if k != "params"}


KEPT_CASES = [("NAdam", None), ("ASGD", None), ("AdEMAMix", None),
              ("AdamWScheduleFree", None), ("Adam", "bfloat16"), ("Adam", "bf16s"),
              ("Adam", "8bit"), ("NAdam", "8bit"), ("AdEMAMix", "8bit"), ("Lion", "8bit"),
              ("ADOPT", None), ("ADOPT", "8bit"), ("Adafactor", None)]
_OPTS = {"ASGD": dict(lr=0.05, t0=3.0, lambd=1e-3), "AdEMAMix": dict(t_alpha_beta3=20),
         "AdamWScheduleFree": dict(warmup_steps=4, lr=0.01), "NAdam": dict(lr=0.01)}


@pytest.mark.parametrize("name,fmt", KEPT_CASES)
def test_kept_equals_planned_and_is_kept(name, fmt):
    t = KeptAndPlanned(name, _OPTS.get(name), fmt)
    t.step(2)
    kept = t.kept._reuses[0]
    t.step(4)
    assert t.kept._reuses[0] is kept and not t.planned.__dict__.get("_reuses")


@pytest.mark.parametrize("name,fmt", KEPT_CASES)
def test_kept_sees_state_replaced_edited_and_loaded(name, fmt):
    t = KeptAndPlanned(name, _OPTS.get(name), fmt)
    t.step(3)
    saved = copy.deepcopy(t.kept.state_dict())

    def replace(params, opt):                     # every state tensor a new object
        for st in opt.state.values():
            for k, v in list(st.items()):
                if isinstance(v, torch.Tensor):
                    st[k] = v.clone()
    t.both(replace)
    t.step(2)

    def edit(params, opt):                        # and edited in place
        st = opt.state[params[0]]
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dtype.is_floating_point and k != "step":
                v.mul_(0.5)
    t.both(edit)
    t.step(2)
    for o in t.opts:
        o.load_state_dict(copy.deepcopy(saved))
    t.step(3)


@pytest.mark.parametrize("name", ["AdEMAMix", "AdamWScheduleFree"])
def test_kept_sees_the_group_count_and_options_changed(name):
    t = KeptAndPlanned(name, _OPTS.get(name))
    t.step(3)
    key = fot.__dict__[name]._rule.group_step

    def rewind(params, opt):
        opt.param_groups[0][key] = 1
        opt.param_groups[0]["lr"] *= 0.5
    t.both(rewind)
    t.step(3)
    t.both(lambda ps, opt: opt.param_groups[0].update(betas=(0.5, 0.9, 0.99)[
        :len(opt.param_groups[0]["betas"])]))
    t.step(2)


def test_kept_adafactor_takes_changed_options_and_its_machine_epsilon():
    t = KeptAndPlanned("Adafactor", dict(lr=0.05))
    t.step(3)
    kept = t.kept._reuses[0]
    for change in (dict(lr=0.01), dict(eps=(1e-20, 1e-3)), dict(eps=(None, 1e-2), d=2.0),
                   dict(weight_decay=0.1, maximize=True)):
        t.both(lambda ps, opt: opt.param_groups[0].update(change))
        t.step(2)
    assert t.kept._reuses[0] is kept
    # a bad option on a kept step is refused as a fresh plan refuses it, nothing changed
    t.both(lambda ps, opt: opt.param_groups[0].update(lr=-1.0))
    errors = []
    for m, o in zip(t.models, t.opts):
        before = [p.clone() for p in m]
        with pytest.raises(ValueError) as e:
            o.step()
        errors.append(str(e.value))
        assert all(torch.equal(a, b) for a, b in zip(before, m))
    assert errors[0] == errors[1]


def test_kept_sophiah_between_its_hessian_steps():
    # the steps that update the Hessian moment read estimates and are planned; the
    # others are kept, and all equal the planned twin's
    t = KeptAndPlanned("SophiaH", dict(update_period=3, lr=0.01))
    gen = torch.Generator().manual_seed(5)
    kept = None
    for k in range(10):
        hs = [torch.rand(p.shape, generator=gen) for p in t.models[0]]
        for a, b in zip(*t.models):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        for o in t.opts:
            o.step(hessian=[h.clone() for h in hs] if k % 3 == 0 else None)
        t.check()
        r = t.kept._reuses.get(0)
        if k % 3 == 0:
            assert r is None
        elif k % 3 == 1:
            assert r is not None
            kept = r
        else:
            assert r is kept


def test_adafactor_is_planned_when_a_gradient_is_not_c_ordered():
    m = [torch.nn.Parameter(torch.randn(6, 4))]
    opt = fot.Adafactor(m)
    for _ in range(3):
        m[0].grad = torch.randn(4, 6).t()
        opt.step()
    assert not opt._reuses.get(0)
    m[0].grad = torch.randn(6, 4)
    opt.step()
    opt.step()
    assert opt._reuses.get(0)


@pytest.mark.parametrize("name", ["ADOPT", "AdEMAMix"])
def test_kept_sees_the_options_kept_as_attributes_changed(name):
    # the oracle rules keep maximize (ADOPT also clip_lambda, a function of the step)
    # on the optimizer, not in its groups
    t = KeptAndPlanned(name, _OPTS.get(name))
    t.step(3)
    kept = t.kept._reuses[0]
    t.both(lambda ps, opt: setattr(opt, "maximize", True))
    t.step(2)
    if name == "ADOPT":
        t.both(lambda ps, opt: setattr(opt, "clip_lambda", lambda step: 0.01 * step))
        t.step(2)
        t.both(lambda ps, opt: setattr(opt, "clip_lambda", None))
        t.step(2)
    t.step(2)
    assert t.kept._reuses[0] is kept


def test_a_kept_adopt_step_with_a_bad_clip_is_refused_and_changes_nothing():
    t = KeptAndPlanned("ADOPT")
    t.step(3)
    assert t.kept._reuses.get(0) is not None
    before = [p.clone() for p in t.models[0]], copy.deepcopy(t.kept.state_dict())
    t.kept.clip_lambda = lambda step: -1.0
    with pytest.raises(ValueError, match=r"clip_lambda\(4\)"):
        t.kept.step()
    assert all(torch.equal(a, b) for a, b in zip(before[0], t.models[0]))
    after = t.kept.state_dict()
    assert after["param_groups"] == before[1]["param_groups"]
    for k, st in before[1]["state"].items():
        assert all(torch.equal(v, after["state"][k][n]) for n, v in st.items())


def test_kept_8bit_sees_formats_and_sizes_changed():
    t = KeptAndPlanned("Adam", dict(lr=0.01), "8bit")
    t.step(3)
    # min_8bit_size up: the 8-bit parameters' state is now refused as a fresh plan
    # refuses it (their state stays 8-bit), kept or not
    for o in t.opts:
        o.param_groups[0]["min_8bit_size"] = 10 ** 6
    errors = []
    for m, o in zip(t.models, t.opts):
        for p in m:
            p.grad = torch.ones_like(p)
        with pytest.raises(ValueError) as e:
            o.step()
        errors.append(str(e.value))
    assert errors[0] == errors[1]
    for o in t.opts:
        o.param_groups[0]["min_8bit_size"] = 16
    t.step(2)


def test_a_gradient_over_a_block_scale_is_refused_by_a_kept_step():
    m = [torch.nn.Parameter(torch.randn(2048)), torch.nn.Parameter(torch.randn(5))]
    opt = fot.Adam([dict(params=m, state_dtype="8bit", min_8bit_size=16)], lr=0.01)
    for _ in range(2):
        for p in m:
            p.grad = torch.randn(p.shape)
        opt.step()
    assert 0 in opt._reuses
    before = [p.detach().clone() for p in m]
    scales = opt.state[m[0]]["exp_avg_sq_absmax"]
    saved = scales.clone()
    m[1].grad = scales[:5]                        # a view of the 8 block scales
    with pytest.raises(ValueError, match="overlaps"):
        opt.step()
    for a, b in zip(before, m):
        assert torch.equal(a, b)
    assert torch.equal(scales, saved)
