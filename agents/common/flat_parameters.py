"""Parameters and gradients that live in one contiguous buffer each.

With small networks updated once per env step, an optimizer's cost is mostly per tensor:
Adam over ten parameter tensors launches ten of everything (and PyTorch's ``zero_grad``
walks them all). :func:`flatten_parameters` moves a module's parameters, and their
gradients, into views of one buffer each and returns one Parameter over the whole buffer,
so one optimizer step updates every weight with one fused kernel. The module keeps its own
Parameters (state dicts, checkpoints and target-network copies are unchanged); they are
now windows onto the flat buffer.

Gradients must then be accumulated in place: autograd does so into an existing ``.grad``,
and hand-written gradients write into the views with ``out=``. Never set the views' grads
to None (``zero_grad(set_to_none=True)``), which would detach them from the buffer; zero
the flat Parameter's ``.grad`` instead.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def flatten_parameters(parameters: Iterable[nn.Parameter]) -> nn.Parameter:
    """Make ``parameters`` (and zeroed gradients) views of one buffer; return that buffer.

    The returned Parameter's ``.grad`` is the concatenation of the views' gradients, so an
    optimizer given only it updates all of them.
    """
    parameters = list(parameters)
    if not parameters:
        raise ValueError("flatten_parameters needs at least one parameter")
    first = parameters[0]
    if any(p.device != first.device or p.dtype != first.dtype for p in parameters):
        raise ValueError("flatten_parameters needs parameters on one device with one dtype")
    total = sum(p.numel() for p in parameters)
    values = torch.empty(total, device=first.device, dtype=first.dtype)
    gradients = torch.zeros_like(values)
    offset = 0
    with torch.no_grad():
        for p in parameters:
            size = p.numel()
            values[offset : offset + size].copy_(p.reshape(-1))
            p.data = values[offset : offset + size].view_as(p)
            p.grad = gradients[offset : offset + size].view_as(p)
            offset += size
    flat = nn.Parameter(values)
    flat.grad = gradients
    return flat


class FlatAdam(torch.optim.Adam):
    """Adam over one flat Parameter (see :func:`flatten_parameters`).

    :meth:`step_flat` calls PyTorch's fused Adam kernel directly: one kernel over every
    weight, without ``Optimizer.step``'s per-call bookkeeping (profiling hooks, state
    grouping), which on this machine costs as much as the kernel itself at the NROWAN
    paper's network size. The state is torch.optim.Adam's (``step``, ``exp_avg``,
    ``exp_avg_sq``), so ``step()`` and checkpoints work as for Adam. Devices without the
    fused kernel fall back to ``step()``.
    """

    def __init__(self, flat: nn.Parameter, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        fused = flat.device.type in ("cpu", "cuda")
        super().__init__([flat], lr=lr, betas=betas, eps=eps, fused=fused or None)

    @torch.no_grad()
    def step_flat(self) -> None:
        group = self.param_groups[0]
        if not group["fused"]:
            self.step()
            return
        (param,) = group["params"]
        state = self.state[param]
        if not state:  # as torch.optim.Adam initialises a fused parameter's state
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        step = state["step"]
        step.add_(1)
        beta1, beta2 = group["betas"]
        torch._fused_adam_([param], [param.grad], [state["exp_avg"]], [state["exp_avg_sq"]], [], [step],
                           amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2,
                           weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
