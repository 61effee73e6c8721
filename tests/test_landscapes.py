"""Every landscape's gradient and Hessian against finite differences, and the
stationary points each one claims."""
import numpy as np
import pytest

from fastoptim import landscapes as L

NAMES = list(L.LANDSCAPES)


def _points(ls, n, seed):
    """Random points in the plot window, plus the start, minima and saddles."""
    rng = np.random.default_rng(seed)
    (x0, x1), (y0, y1) = ls.bounds
    pts = [np.array([rng.uniform(x0, x1), rng.uniform(y0, y1)]) for _ in range(n)]
    pts += [np.asarray(q, dtype=np.float64) for q in (ls.start, *ls.minima, *ls.saddles)]
    return pts


def _fd_grad(ls, p, h):
    e = np.eye(2)
    return np.array([(ls.f(p + h * e[i]) - ls.f(p - h * e[i])) / (2 * h) for i in range(2)])


def _fd_hessian(ls, p, h):
    e = np.eye(2)
    cols = [(ls.grad(p + h * e[i]) - ls.grad(p - h * e[i])) / (2 * h) for i in range(2)]
    return np.stack(cols, axis=1)


def _fd_tol(ls, p):
    """Central differences with h = 1e-5 err by ~h^2 f'''/6 (truncation) plus
    ~eps |f| / h (rounding): well below 1e-6 of the function's scale here."""
    return 1e-6 * (1.0 + abs(float(ls.f(p))) + float(np.abs(ls.grad(p)).max()))


@pytest.mark.parametrize("name", NAMES)
def test_gradient_matches_finite_differences(name):
    ls = L.get(name)
    h = 1e-5
    for p in _points(ls, 30, seed=1):
        g = ls.grad(p)
        fd = _fd_grad(ls, p, h)
        assert g.shape == (2,)
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=_fd_tol(ls, p),
                                   err_msg=f"{name} at {p}")


@pytest.mark.parametrize("name", NAMES)
def test_hessian_matches_finite_differences(name):
    ls = L.get(name)
    h = 1e-5
    for p in _points(ls, 30, seed=2):
        hess = ls.hessian(p)
        fd = _fd_hessian(ls, p, h)
        assert hess.shape == (2, 2)
        scale = 1.0 + float(np.abs(hess).max())
        np.testing.assert_allclose(hess, fd, rtol=1e-6, atol=1e-6 * scale,
                                   err_msg=f"{name} at {p}")
        np.testing.assert_array_equal(hess, hess.T)


@pytest.mark.parametrize("name", NAMES)
def test_hvp_is_hessian_times_vector(name):
    ls = L.get(name)
    rng = np.random.default_rng(3)
    for p in _points(ls, 5, seed=3):
        v = rng.standard_normal(2)
        np.testing.assert_allclose(ls.hvp(p, v), ls.hessian(p) @ v, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_grid_evaluation_equals_pointwise(name):
    """f, grad and hessian take a grid of points (2, ...) as the contour plots do."""
    ls = L.get(name)
    (x0, x1), (y0, y1) = ls.bounds
    grid = np.stack(np.meshgrid(np.linspace(x0, x1, 4), np.linspace(y0, y1, 3)))
    f, g, h = ls.f(grid), ls.grad(grid), ls.hessian(grid)
    assert f.shape == (3, 4) and g.shape == (2, 3, 4) and h.shape == (2, 2, 3, 4)
    for i in range(3):
        for j in range(4):
            p = grid[:, i, j]
            assert f[i, j] == pytest.approx(float(ls.f(p)), rel=1e-14, abs=1e-14)
            np.testing.assert_allclose(g[:, i, j], ls.grad(p), rtol=1e-14, atol=1e-14)
            np.testing.assert_allclose(h[:, :, i, j], ls.hessian(p), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_stationary_points(name):
    """Minima: zero gradient, positive semidefinite Hessian, f = f_min, and no
    random point in the window lower. Saddles: zero gradient, and a Hessian with a
    negative eigenvalue (or a vanishing one: the monkey saddle is degenerate)."""
    ls = L.get(name)
    for m in ls.minima:
        m = np.asarray(m, dtype=np.float64)
        np.testing.assert_allclose(ls.grad(m), 0.0, atol=1e-12)
        assert np.linalg.eigvalsh(ls.hessian(m)).min() >= -1e-12
        assert float(ls.f(m)) == pytest.approx(ls.f_min, abs=1e-15)
    if ls.minima:
        for p in _points(ls, 200, seed=4):
            assert float(ls.f(p)) >= ls.f_min - 1e-12
    else:
        assert ls.f_min is None
    for s in ls.saddles:
        s = np.asarray(s, dtype=np.float64)
        np.testing.assert_allclose(ls.grad(s), 0.0, atol=1e-12)
        lam = np.linalg.eigvalsh(ls.hessian(s))
        assert lam.min() < 0 < lam.max() or np.all(lam == 0)
        # a saddle, not an extremum: some nearby point is lower and some higher
        ring = [s + 1e-3 * np.array([np.cos(t), np.sin(t)]) for t in np.linspace(0, 6.28, 60)]
        vals = [float(ls.f(q)) - float(ls.f(s)) for q in ring]
        assert min(vals) < 0 < max(vals)


def test_known_values():
    assert L.get("saddle").f(np.array([2.0, 1.0])) == 3.0
    assert L.get("monkey").f(np.array([1.0, 1.0])) == -2.0
    assert L.get("rosenbrock").f(np.array([-1.2, 1.0])) == pytest.approx(24.2)
    assert L.get("beale").f(np.array([0.0, 1.0])) == pytest.approx(1.5**2 + 2.25**2 + 2.625**2)
    assert L.get("plateau").f(np.array([3.0, 0.0])) == pytest.approx(np.tanh(9.0))
    q = L.get("quadratic")
    np.testing.assert_allclose(np.linalg.eigvalsh(q.matrix), [q.l1, q.l2])


def test_parameters_and_lookup():
    r = L.Rosenbrock(a=2.0, b=10.0)
    assert r.minima == ((2.0, 4.0),)
    np.testing.assert_allclose(r.grad(np.array([2.0, 4.0])), 0.0)
    q = L.Quadratic(l1=2.0, l2=50.0, angle=0.3)
    np.testing.assert_allclose(q.hessian(np.zeros(2)), q.matrix)
    assert L.get("saddle") is not L.get("saddle")
    with pytest.raises(ValueError, match="unknown landscape"):
        L.get("nope")
    with pytest.raises(ValueError, match="shape"):
        L.get("saddle").f(np.zeros(3))
