"""Sharpness-Aware Minimization (Foret et al., ICLR 2021) with ASAM's adaptive scaling (Kwon et al., ICML 2021)."""

from __future__ import annotations

import torch


class SAM(torch.optim.Optimizer):
    """SAM around a base optimizer that shares its parameter groups.

    After a backward pass, :meth:`first_step` moves every parameter ``w`` to ``w + e_w``::

        e_w = rho * T(w)^2 * g / (|| T(w) * g ||_2 + 1e-12)

    with ``g`` its gradient, the norm taken over all parameters together, and
    ``T(w) = |w|`` if ``adaptive`` else 1. After a second backward pass at
    ``w + e_w``, :meth:`second_step` restores ``w`` and applies the base optimizer with
    the gradient computed at the perturbed point. Parameters without a gradient are
    not perturbed.

    Args:
        params: parameters or parameter groups.
        base_optimizer: an optimizer class, e.g. ``torch.optim.SGD``.
        rho: perturbation radius (>= 0); ``rho = 0`` leaves ``w`` where it is.
        adaptive: ASAM's scale-invariant radius ``T(w) = |w|``.
        **base_kwargs: the base optimizer's arguments (lr, momentum, weight_decay, ...).

    ``state_dict()`` holds the base optimizer's state (momentum buffers) and SAM's
    settings; the remembered ``w`` matters only between the two steps and is not saved.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, **base_kwargs):
        if rho < 0:
            raise ValueError(f"optim.rho must be >= 0, got {rho}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups  # one set of groups: lr changes reach both
        self.defaults.update(self.base_optimizer.defaults)
        # buffers kept from step to step (a fresh copy of every parameter at each step costs allocation and
        # page faults that are a visible share of a CPU step): w while at w + e_w, and the work space of e_w
        self._saved: dict[torch.Tensor, torch.Tensor] = {}
        self._work: dict[torch.Tensor, torch.Tensor] = {}
        self._perturbed: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # (params, saved) since first_step

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter with a gradient from ``w`` to ``w + e_w`` (``w`` is remembered for :meth:`second_step`).

        No tensor is allocated per step beyond the per-group norms: ``e_w`` is built in kept buffers.
        """
        groups = []  # (group, params with a gradient, work buffers holding T(w) * g up to sign)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            work = [self._buffer(self._work, p) for p in params]
            if params:
                torch._foreach_copy_(work, [p.grad for p in params])
                if group["adaptive"]:
                    torch._foreach_mul_(work, params)  # w * g: the norm of |w| * g
            groups.append((group, params, work))
        norms = [n for _, _, work in groups for n in torch._foreach_norm(work)]
        if norms:
            grad_norm = torch.linalg.vector_norm(torch.stack(norms).float())
            for group, params, work in groups:
                if not params:
                    continue
                saved = [self._buffer(self._saved, p) for p in params]
                torch._foreach_copy_(saved, params)
                self._perturbed.append((params, saved))
                if group["adaptive"]:
                    torch._foreach_mul_(work, params)  # T(w)^2 g = w * (w * g)
                torch._foreach_mul_(work, (group["rho"] / (grad_norm + 1e-12)).to(params[0].dtype))
                torch._foreach_add_(params, work)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @staticmethod
    def _buffer(store: dict[torch.Tensor, torch.Tensor], p: torch.Tensor) -> torch.Tensor:
        """``store``'s buffer for parameter ``p`` (made once, again only if ``p`` changes shape, dtype or device)."""
        buf = store.get(p)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = store[p] = torch.empty_like(p, memory_format=torch.preserve_format)
        return buf

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for params, saved in self._perturbed:
            torch._foreach_copy_(params, saved)
        self._perturbed.clear()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def step(self, closure=None):
        """One SAM step with ``closure`` (zero grads, forward, backward, return loss); returns the first loss."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that recomputes the loss and calls backward(); or call first_step/second_step")
        closure = torch.enable_grad()(closure)
        loss = closure()
        self.first_step(zero_grad=True)
        closure()
        self.second_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"base": self.base_optimizer.state_dict(),
                "rho": [g["rho"] for g in self.param_groups], "adaptive": [g["adaptive"] for g in self.param_groups]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups
        for g, rho, adaptive in zip(self.param_groups, state_dict["rho"], state_dict["adaptive"]):
            g["rho"], g["adaptive"] = rho, adaptive
