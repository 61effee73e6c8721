"""Two-dimensional test functions with exact gradients and Hessians.

Each one shows a way that plain gradient steps struggle:

* :class:`Saddle` ``x^2 - y^2``: near the saddle point the gradient vanishes, and a
  start near the ridge (the x axis, along which the gradient flows *into* the
  saddle) takes plain gradient descent there and leaves it stalled.
* :class:`MonkeySaddle` ``x^3 - 3xy^2``: a degenerate saddle (gradient and Hessian
  both vanish), with three valleys going down.
* :class:`Plateau` ``tanh(x^2/a^2 + y^2/b^2)``: a well surrounded by a plateau where
  the gradient is exponentially small.
* :class:`Rosenbrock` ``(a-x)^2 + b(y-x^2)^2``: a narrow curved valley.
* :class:`Quadratic` ``(l1 u^2 + l2 w^2)/2`` in coordinates rotated by ``angle``: an
  ill-conditioned (narrow, deep) minimum where a constant step zig-zags.
* :class:`Beale`: steep walls, flat floor, a minimum at (3, 0.5).

Every landscape has ``f(p)``, ``grad(p)``, ``hessian(p)`` (and ``hvp(p, v)``), a
default ``start``, its ``minima`` (points; empty when it is unbounded below), its
``saddles``, the minimum value ``f_min`` (None when unbounded), and plot ``bounds``
``((xmin, xmax), (ymin, ymax))``. ``p`` is a point ``(x, y)``; ``f``, ``grad`` and
``hessian`` also take arrays ``p`` of shape ``(2, ...)`` (a grid) and then return
shapes ``(...)``, ``(2, ...)`` and ``(2, 2, ...)``.
"""
import math

import numpy as np

__all__ = ["Landscape", "Saddle", "MonkeySaddle", "Plateau", "Rosenbrock", "Quadratic",
           "Beale", "LANDSCAPES", "get"]


def _xy(p):
    p = np.asarray(p, dtype=np.float64)
    if p.shape[:1] != (2,):
        raise ValueError(f"a point must have shape (2,) or (2, ...), got {p.shape}")
    return p[0], p[1]


def _vec(a, b):
    a, b = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    return np.stack([a, b])


def _mat(a, b, c, d):
    a, b, c, d = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (a, b, c, d)))
    return np.stack([np.stack([a, b]), np.stack([c, d])])


class Landscape:
    """A 2-D test function: value, gradient, Hessian, and what a plot needs."""

    #: short identifier (file names, command line)
    name = ""
    #: one-line description with the formula
    title = ""
    #: default start of the demo's runs
    start = (0.0, 0.0)
    #: points where the minimum is attained (empty: unbounded below)
    minima = ()
    #: saddle points
    saddles = ()
    #: plot window ((xmin, xmax), (ymin, ymax))
    bounds = ((-1.0, 1.0), (-1.0, 1.0))
    #: contour levels spaced logarithmically (for landscapes with a huge range)
    log_contours = False

    def f(self, p):
        raise NotImplementedError

    def grad(self, p):
        raise NotImplementedError

    def hessian(self, p):
        raise NotImplementedError

    def hvp(self, p, v):
        """Hessian-vector product H(p) @ v."""
        return self.hessian(p) @ np.asarray(v, dtype=np.float64)

    @property
    def f_min(self):
        """The minimum value, or None when the function is unbounded below."""
        if not self.minima:
            return None
        return float(min(self.f(np.asarray(m, dtype=np.float64)) for m in self.minima))

    def __repr__(self):
        return f"{type(self).__name__}()"


class Saddle(Landscape):
    """f = x^2 - y^2: a saddle at the origin, unbounded below along y.

    Gradient descent along the x axis (the ridge) flows into the saddle; any
    y != 0 grows only by the factor (1 + 2 lr) per step, so a start near the ridge
    escapes slowly."""
    name = "saddle"
    title = "saddle  x^2 - y^2"
    start = (1.0, 1e-3)
    saddles = ((0.0, 0.0),)
    bounds = ((-1.5, 1.5), (-1.5, 1.5))

    def f(self, p):
        x, y = _xy(p)
        return x * x - y * y

    def grad(self, p):
        x, y = _xy(p)
        return _vec(2 * x, -2 * y)

    def hessian(self, p):
        x, y = _xy(p)
        return _mat(2.0 + 0 * x, 0 * x, 0 * x, -2.0 + 0 * x)


class MonkeySaddle(Landscape):
    """f = x^3 - 3 x y^2: a degenerate saddle at the origin (gradient and Hessian
    vanish there) with three valleys going down (at angles 60, 180 and 300 degrees)
    and three ridges; unbounded below."""
    name = "monkey"
    title = "monkey saddle  x^3 - 3xy^2"
    start = (1.0, 1e-3)
    saddles = ((0.0, 0.0),)
    bounds = ((-1.5, 1.5), (-1.5, 1.5))

    def f(self, p):
        x, y = _xy(p)
        return x ** 3 - 3 * x * y ** 2

    def grad(self, p):
        x, y = _xy(p)
        return _vec(3 * x * x - 3 * y * y, -6 * x * y)

    def hessian(self, p):
        x, y = _xy(p)
        return _mat(6 * x, -6 * y, -6 * y, -6 * x)


class Plateau(Landscape):
    """f = tanh(q), q = (x/a)^2 + (y/b)^2: a well at the origin inside a plateau at
    height 1 where the gradient, 2 sech^2(q) (x/a^2, y/b^2), is exponentially small."""
    name = "plateau"
    title = "tanh plateau  tanh(x^2/a^2 + y^2/b^2)"
    start = (2.0, 1.2)
    minima = ((0.0, 0.0),)
    bounds = ((-2.5, 2.5), (-2.5, 2.5))

    def __init__(self, a=1.0, b=1.0):
        self.a, self.b = float(a), float(b)
        self.title = f"tanh plateau  tanh(x^2/{self.a ** 2:g} + y^2/{self.b ** 2:g})"

    def _q(self, x, y):
        return (x / self.a) ** 2 + (y / self.b) ** 2

    def f(self, p):
        x, y = _xy(p)
        return np.tanh(self._q(x, y))

    def grad(self, p):
        x, y = _xy(p)
        s2 = 1.0 / np.cosh(self._q(x, y)) ** 2
        return _vec(s2 * 2 * x / self.a ** 2, s2 * 2 * y / self.b ** 2)

    def hessian(self, p):
        # f = tanh(q): H = tanh''(q) dq dq^T + tanh'(q) d2q,
        # tanh' = sech^2, tanh'' = -2 tanh sech^2.
        x, y = _xy(p)
        q = self._q(x, y)
        t = np.tanh(q)
        s2 = 1.0 / np.cosh(q) ** 2
        d2 = -2 * t * s2
        qx, qy = 2 * x / self.a ** 2, 2 * y / self.b ** 2
        return _mat(d2 * qx * qx + s2 * 2 / self.a ** 2, d2 * qx * qy,
                    d2 * qx * qy, d2 * qy * qy + s2 * 2 / self.b ** 2)

    def __repr__(self):
        return f"Plateau(a={self.a:g}, b={self.b:g})"


class Rosenbrock(Landscape):
    """f = (a - x)^2 + b (y - x^2)^2: a narrow curved valley along y = x^2, minimum 0
    at (a, a^2)."""
    name = "rosenbrock"
    title = "Rosenbrock valley  (1-x)^2 + 100(y-x^2)^2"
    start = (-1.2, 1.0)
    bounds = ((-2.0, 2.0), (-1.0, 3.0))
    log_contours = True

    def __init__(self, a=1.0, b=100.0):
        self.a, self.b = float(a), float(b)
        self.minima = ((self.a, self.a ** 2),)
        self.title = f"Rosenbrock valley  ({self.a:g}-x)^2 + {self.b:g}(y-x^2)^2"

    def f(self, p):
        x, y = _xy(p)
        return (self.a - x) ** 2 + self.b * (y - x * x) ** 2

    def grad(self, p):
        x, y = _xy(p)
        r = y - x * x
        return _vec(-2 * (self.a - x) - 4 * self.b * x * r, 2 * self.b * r)

    def hessian(self, p):
        x, y = _xy(p)
        hxx = 2 - 4 * self.b * (y - x * x) + 8 * self.b * x * x
        hxy = -4 * self.b * x
        return _mat(hxx, hxy, hxy, 2 * self.b + 0 * x)

    def __repr__(self):
        return f"Rosenbrock(a={self.a:g}, b={self.b:g})"


class Quadratic(Landscape):
    """f = (l1 u^2 + l2 w^2) / 2 with (u, w) the coordinates rotated by ``angle``:
    a narrow, deep minimum of condition number l2/l1 at the origin. A constant step
    must stay below 2/l2 to be stable across the valley, which makes it l2/l1 times
    too small along it. One Newton step with lr=1 lands on the minimum."""
    name = "quadratic"
    start = (-2.0, 1.0)
    minima = ((0.0, 0.0),)
    bounds = ((-2.5, 2.5), (-2.0, 2.0))

    def __init__(self, l1=1.0, l2=25.0, angle=math.pi / 9):
        self.l1, self.l2, self.angle = float(l1), float(l2), float(angle)
        c, s = math.cos(self.angle), math.sin(self.angle)
        q = np.array([[c, -s], [s, c]])
        m = q @ np.diag([self.l1, self.l2]) @ q.T
        self.matrix = (m + m.T) / 2          # exactly symmetric
        self.title = (f"narrow deep minimum  (u^2 + {self.l2 / self.l1:g} w^2)/2, "
                      f"rotated {math.degrees(self.angle):g} deg")

    def f(self, p):
        x, y = _xy(p)
        a = self.matrix
        return 0.5 * (a[0, 0] * x * x + 2 * a[0, 1] * x * y + a[1, 1] * y * y)

    def grad(self, p):
        x, y = _xy(p)
        a = self.matrix
        return _vec(a[0, 0] * x + a[0, 1] * y, a[1, 0] * x + a[1, 1] * y)

    def hessian(self, p):
        x, y = _xy(p)
        a = self.matrix
        z = 0 * x
        return _mat(a[0, 0] + z, a[0, 1] + z, a[1, 0] + z, a[1, 1] + z)

    def __repr__(self):
        return f"Quadratic(l1={self.l1:g}, l2={self.l2:g}, angle={self.angle:g})"


class Beale(Landscape):
    """Beale's function: sum over k=1..3 of (c_k - x + x y^k)^2 with
    c = (1.5, 2.25, 2.625); minimum 0 at (3, 0.5), a saddle at (0, 1)."""
    name = "beale"
    title = "Beale  sum_k (c_k - x + x y^k)^2"
    start = (1.0, 1.5)
    minima = ((3.0, 0.5),)
    saddles = ((0.0, 1.0),)
    bounds = ((-1.0, 4.5), (-1.5, 2.5))
    log_contours = True
    _c = (1.5, 2.25, 2.625)

    def f(self, p):
        x, y = _xy(p)
        return sum((c - x + x * y ** k) ** 2 for k, c in enumerate(self._c, start=1))

    def grad(self, p):
        x, y = _xy(p)
        gx = gy = 0.0
        for k, c in enumerate(self._c, start=1):
            r = c - x + x * y ** k
            gx = gx + 2 * r * (y ** k - 1)
            gy = gy + 2 * r * k * x * y ** (k - 1)
        return _vec(gx, gy)

    def hessian(self, p):
        # r_k = c_k - x + x y^k; dr/dx = y^k - 1, dr/dy = k x y^(k-1),
        # d2r/dxdy = k y^(k-1), d2r/dy2 = k (k-1) x y^(k-2), d2r/dx2 = 0;
        # H = 2 sum (grad r grad r^T + r hess r).
        x, y = _xy(p)
        hxx = hxy = hyy = 0.0
        for k, c in enumerate(self._c, start=1):
            r = c - x + x * y ** k
            rx = y ** k - 1
            ry = k * x * y ** (k - 1)
            rxy = k * y ** (k - 1)
            ryy = k * (k - 1) * x * y ** (k - 2) if k >= 2 else 0.0 * x
            hxx = hxx + 2 * rx * rx
            hxy = hxy + 2 * (rx * ry + r * rxy)
            hyy = hyy + 2 * (ry * ry + r * ryy)
        return _mat(hxx, hxy, hxy, hyy)


def _all():
    return {ls.name: ls for ls in (Saddle(), MonkeySaddle(), Plateau(), Rosenbrock(),
                                   Quadratic(), Beale())}


#: one instance of each landscape with its default parameters, by name
LANDSCAPES = _all()


def get(name):
    """The landscape called ``name`` (a new instance with default parameters)."""
    table = _all()
    if name not in table:
        raise ValueError(f"unknown landscape {name!r}; known: {', '.join(table)}")
    return table[name]
