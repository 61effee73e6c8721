"""Hutchinson's Hessian-diagonal estimate from PyTorch autograd, for AdaHessian.

torch is imported lazily (only when :func:`hutchinson_diag` runs), so importing this
module costs nothing without torch. ``fastoptim.torch`` re-exports the function.

    loss = model_loss(params)
    diags, grads = hutchinson_diag(loss, params, return_grads=True)
    opt.step([g.numpy() for g in grads], [d.numpy() for d in diags])

Each sample costs one Hessian-vector product: the gradient is computed with
``create_graph=True`` and differentiated again along a Rademacher vector z, giving
``H z`` without forming H; ``z * (H z)`` is an unbiased estimate of diag(H).
"""
import numbers

__all__ = ["hutchinson_diag"]


def hutchinson_diag(loss, params, n_samples=1, generator=None, *, spatial_average=False,
                    return_grads=False):
    """Estimate the diagonal of the Hessian of ``loss`` w.r.t. each tensor of ``params``.

    Parameters
    ----------
    loss : torch.Tensor
        A scalar that depends on ``params`` through differentiable operations.
    params : sequence of torch.Tensor
        Tensors with ``requires_grad=True``.
    n_samples : int
        Rademacher vectors to average (each costs one Hessian-vector product).
    generator : torch.Generator, optional
        Source of the Rademacher vectors (for reproducible estimates).
    spatial_average : bool
        For tensors of 3 or more dimensions (convolution kernels), average the
        absolute estimate over the spatial dimensions (2 and beyond), as AdaHessian's
        authors do; see :func:`fastoptim.hessian.spatial_average`.
    return_grads : bool
        Also return the gradients (computed on the way), detached.

    Returns
    -------
    A list of detached tensors shaped like ``params`` (and the list of gradients when
    ``return_grads``). The graph of ``loss`` is kept (``retain_graph``), so the caller
    may still call ``loss.backward()``.
    """
    import torch

    if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) \
            or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be a sequence of tensors, not a single tensor "
                        "(wrap it in a list)")
    params = list(params)
    if not params:
        raise ValueError("params is empty")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if not p.requires_grad:
            raise ValueError(f"params[{i}] does not require grad")
        if not p.is_floating_point():
            raise TypeError(f"params[{i}] must be a floating-point tensor, got {p.dtype}")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("loss must be a scalar tensor")

    grads = torch.autograd.grad(loss, params, create_graph=True)
    # A gradient that does not depend on the parameters (loss linear in that tensor)
    # has a zero Hessian block: its estimate is zero, and it is left out of the
    # Hessian-vector products (autograd cannot differentiate a constant).
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    for _ in range(n_samples if live else 0):
        zs = [torch.randint(0, 2, params[i].shape, generator=generator,
                            device=params[i].device).to(params[i].dtype).mul_(2).sub_(1)
              for i in live]
        hzs = torch.autograd.grad([grads[i] for i in live], [params[i] for i in live],
                                  grad_outputs=zs, retain_graph=True, allow_unused=True)
        with torch.no_grad():
            for i, z, hz in zip(live, zs, hzs):
                if hz is not None:
                    acc[i].add_(z * hz)
    diags = []
    with torch.no_grad():
        for a in acc:
            d = a / n_samples
            if spatial_average and d.dim() >= 3:
                dims = tuple(range(2, d.dim()))
                d = d.abs().mean(dim=dims, keepdim=True).expand_as(d).clone()
            diags.append(d)
    if return_grads:
        return diags, [g.detach() for g in grads]
    return diags
