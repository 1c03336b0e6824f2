"""TD3's update written out by hand: forward passes, gradients and Adam with no autograd.

One update of the deterministic actor-critic family (DDPG, TD3, RUD) is a fixed sequence
of matrix products on a 256-transition minibatch. Autograd records a graph for it, walks
that graph back and hands the gradients to ``Optimizer.step``; on a CPU with small MLPs
that bookkeeping costs about as much as the arithmetic. :class:`FusedTD3Update` does the
same maths directly on the module's own parameters:

1. target: ``y = r + gamma (1 - terminated) min_i Q'_i(s', clip(mu'(s') + noise, -1, 1))``;
2. critic step: ``L = sum_i mean_b (Q_i(s, a) - y)^2``, gradients by the chain rule
   (each activation's derivative is read from its output), one fused Adam step;
3. every ``policy_delay`` critic steps, actor step: ``L = -mean_b Q_1(s, mu(s))`` through
   the just-updated critic 1 (whose weights get no gradient), one fused Adam step, then
   Polyak averaging of both target networks (one ``_foreach_lerp_``).

Every product writes into the gradient tensors the optimizer already holds, the Adam state
lives in the optimizer (checkpoints and learning-rate schedules see no difference), and
the result equals the autograd path to float rounding (``tests/test_rud.py`` checks both
from the same weights on the same minibatches).

With 256-wide layers a small operator costs a few microseconds, as much as the Python
around it, so what is fixed for a block is prepared once per block (:meth:`prepare`): the
parameter and gradient views each product reads, the fused Adam kernel's tensor lists,
and one step-count tensor per parameter group whose elements are the parameters'
``state["step"]`` (one ``add_`` counts a step for all of them; an optimizer state loaded
from a checkpoint gets its own at the next block). Metrics are summed in place into the
caller's ``totals``.

With ``hidden_precision="bfloat16"`` (CPU only) the products between hidden layers, the
``width x width`` ones that hold ~90 % of the arithmetic (forward passes, the backward
pass's weight and input gradients), round their operands to bfloat16 and sum in float32
(oneDNN's ``bf16`` float32 precision: AMX or AVX-512 BF16 kernels). Every tensor kept
(weights, Adam state, activations, gradients) and every other product (the first layers'
thin ones, the Q and action heads) stays float32. oneDNN's setting is process-wide, so it
is switched on around those products only and put back after each (:meth:`restore_precision`).

It applies to :class:`~agents.rud.rud_rl_module.RUDTorchRLModule`'s own networks
(:func:`supports`); a module with other networks learns through autograd. Fused Adam is
called directly, so optimizer step hooks do not run (AMSGrad, AdamW and unfused
optimizers go through ``Optimizer.step``).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from agents.common.networks import DeterministicActor, FusedCritics

Tensor = torch.Tensor

# oneDNN's float32 matmul setting: "none" or "ieee" (float32 throughout), "bf16" (operands rounded
# to bfloat16, sums in float32), ...; process-wide: the update sets it around the hidden products only
_ONEDNN_MATMUL = torch.backends.mkldnn.matmul

HIDDEN_PRECISIONS = {"float32": None, "bfloat16": "bf16"}
"""``hidden_matmul_precision`` values and the oneDNN setting each runs the hidden products with."""

# Each activation in place, and its derivative applied to an upstream gradient, written in
# terms of the activation's output (which is all the backward pass keeps).
_ACTIVATE: dict[type, Callable[[Tensor], Tensor]] = {
    nn.ReLU: torch.relu_,
    nn.Tanh: torch.tanh_,
    nn.ELU: lambda x: torch.nn.functional.elu_(x),
}


def _relu_gradient(grad: Tensor, output: Tensor) -> Tensor:
    return torch.ops.aten.threshold_backward(grad, output, 0.0)  # grad where output > 0, else 0


def _tanh_gradient(grad: Tensor, output: Tensor) -> Tensor:
    return grad * (1.0 - output * output)


def _elu_gradient(grad: Tensor, output: Tensor) -> Tensor:
    # elu(x) = x for x > 0, exp(x) - 1 otherwise: the derivative is 1 or output + 1
    return torch.where(output > 0, grad, grad * (output + 1.0))


_GRADIENT: dict[type, Callable[[Tensor, Tensor], Tensor]] = {
    nn.ReLU: _relu_gradient,
    nn.Tanh: _tanh_gradient,
    nn.ELU: _elu_gradient,
}


def _actor_layers(actor: nn.Module) -> tuple[list[nn.Linear], type] | None:
    """The Linear layers and the hidden activation of a stock DeterministicActor, else None."""
    if type(actor) is not DeterministicActor:
        return None
    modules = list(actor.net)
    linears = modules[0::2]
    activations = modules[1:-1:2]
    if (not all(type(layer) is nn.Linear for layer in linears) or type(modules[-1]) is not nn.Tanh
            or len(modules) != 2 * len(linears) or len({type(a) for a in activations}) > 1):
        return None
    activation = type(activations[0]) if activations else nn.ReLU
    if activation not in _ACTIVATE or any(isinstance(a, nn.ELU) and a.alpha != 1.0 for a in activations):
        return None
    return linears, activation


def _restores_precision(method: Callable) -> Callable:
    """Puts oneDNN's precision back when ``method`` returns or raises: a failure inside a
    hidden product must not leave the process computing in bfloat16."""
    @functools.wraps(method)
    def restoring(self: "FusedTD3Update", *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        finally:
            self.restore_precision()
    return restoring


def supports(module: nn.Module) -> bool:
    """Whether :class:`FusedTD3Update` can run this module's updates: the stock actor and
    critics (DeterministicActor, FusedCritics) in float32, ReLU/Tanh/ELU activations."""
    critic = getattr(module, "critic", None)
    if type(critic) is not FusedCritics or type(getattr(module, "target_critic", None)) is not FusedCritics:
        return False
    if type(critic.activation) not in _ACTIVATE or (isinstance(critic.activation, nn.ELU) and critic.activation.alpha != 1.0):
        return False
    if _actor_layers(module.actor) is None or _actor_layers(getattr(module, "target_actor", None)) is None:
        return False
    return all(p.dtype == torch.float32 for p in module.parameters())


class _CriticViews:
    """A FusedCritics' parameters and gradients in the shapes the products read: made once
    per block, not once per product (each view costs as much Python as a small kernel)."""

    def __init__(self, critic: FusedCritics, obs_dim: int, with_gradients: bool):
        n, width = critic.num_critics, critic.hidden[0]
        in_dim = critic.first_weight.shape[0]
        self.n, self.width = n, width
        # the first layer as [n, in, width] and [n, 1, width]: a batched product over a
        # shared input straight into [n, batch, width], no transposing copy afterwards
        self.first_weight = critic.first_weight.view(in_dim, n, width).transpose(0, 1)
        self.first_bias = critic.first_bias.view(n, 1, width)
        self.hidden = [(w, b, w.transpose(1, 2)) for w, b in zip(critic.hidden_weights, critic.hidden_biases)]
        self.head_weight = critic.head_weight
        self.head_weight_t = critic.head_weight.transpose(1, 2)
        self.head_bias = critic.head_bias.unsqueeze(-1)
        # critic 1 alone (the actor step): plain 2-D products
        self.first_weight_1, self.first_bias_1 = critic.first_weight[:, :width], critic.first_bias[:width]
        self.hidden_1 = [(w[0], b[0, 0], w[0].t()) for w, b in zip(critic.hidden_weights, critic.hidden_biases)]
        self.head_weight_1_t, self.head_bias_1 = critic.head_weight[0].t(), critic.head_bias[0]
        self.head_weight_1 = critic.head_weight[0]
        self.action_weight_1_t = critic.first_weight[obs_dim:, :width].t()
        if with_gradients:
            self.head_weight_grad, self.head_bias_grad = critic.head_weight.grad, critic.head_bias.grad
            self.hidden_grads = [(w.grad, b.grad) for w, b in zip(critic.hidden_weights, critic.hidden_biases)]
            self.first_weight_grad = critic.first_weight.grad.view(in_dim, n, width)
            self.first_bias_grad = critic.first_bias.grad.view(n, width)


class _ActorViews:
    """A DeterministicActor's Linear layers as ``(weight, weight.t(), bias, weight grad,
    bias grad)``, made once per block."""

    def __init__(self, layers: list[nn.Linear], with_gradients: bool):
        self.layers = [(layer.weight, layer.weight.t(), layer.bias,
                        layer.weight.grad if with_gradients else None, layer.bias.grad if with_gradients else None)
                       for layer in layers]


class FusedTD3Update:
    """Runs TD3 updates on ``module``'s parameters with ``critic_optimizer`` and
    ``actor_optimizer`` (torch Adam), writing gradients by hand.

    ``tau`` is the Polyak coefficient. The caller folds the discount into the ``discounts``
    it passes to :meth:`target` and decides when to take an actor step (``policy_delay``).
    ``totals`` (4 values) accumulates, per update, the critic loss, the mean Q, the actor
    loss (at actor steps) and the mean target Q (per minibatch passed to :meth:`target`).
    ``hidden_precision`` is ``"float32"`` or ``"bfloat16"`` (the hidden-layer products on
    the CPU; module docstring).
    """

    def __init__(self, module: nn.Module, critic_optimizer: torch.optim.Optimizer,
                 actor_optimizer: torch.optim.Optimizer, *, tau: float, totals: Tensor,
                 hidden_precision: str = "float32"):
        if not supports(module):
            raise ValueError("FusedTD3Update needs RUDTorchRLModule's stock float32 networks")
        if hidden_precision not in HIDDEN_PRECISIONS:
            raise ValueError(f"hidden_precision must be one of {sorted(HIDDEN_PRECISIONS)}, got {hidden_precision!r}")
        device = next(module.parameters()).device
        if HIDDEN_PRECISIONS[hidden_precision] is not None and device.type != "cpu":
            raise ValueError(f"hidden_precision={hidden_precision!r} applies to CPU Learners; this module is on {device}")
        self._reduced_precision = HIDDEN_PRECISIONS[hidden_precision]
        self._outer_precision = _ONEDNN_MATMUL.fp32_precision
        self.module = module
        self.critic_optimizer = critic_optimizer
        self.actor_optimizer = actor_optimizer
        self.tau = tau
        self._critic_loss, self._q_mean, self._actor_loss, self._target_mean = totals.unbind()
        self.actor, actor_activation = _actor_layers(module.actor)
        self.target_actor, _ = _actor_layers(module.target_actor)
        self.actor_activate, self.actor_gradient = _ACTIVATE[actor_activation], _GRADIENT[actor_activation]
        critic_activation = type(module.critic.activation)
        self.critic_activate, self.critic_gradient = _ACTIVATE[critic_activation], _GRADIENT[critic_activation]
        self.obs_dim = module.obs_dim
        self.online = [p for online, _ in module.get_target_network_pairs() for p in online.parameters()]
        self.targets = [p for _, target in module.get_target_network_pairs() for p in target.parameters()]
        self._trained = [p for optimizer in (critic_optimizer, actor_optimizer)
                         for group in optimizer.param_groups for p in group["params"]]
        self._gradients: list[Tensor | None] = []
        self._adam_plans: dict[torch.optim.Optimizer, list[tuple[dict, list[list[Tensor]], Tensor]] | None] = {}

    # ------------------------------------------------------------------ set-up per block

    def prepare(self) -> None:
        """Give every trained parameter a gradient tensor to write into and every optimizer
        its Adam state (as ``torch.optim.Adam`` would create on its first step), then make
        the views the updates read. Cheap when nothing changed since the last block."""
        for optimizer in (self.critic_optimizer, self.actor_optimizer):
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    if parameter.grad is None:
                        parameter.grad = torch.zeros_like(parameter)
                    state = optimizer.state[parameter]
                    if not state:
                        fused_or_capturable = bool(group.get("fused") or group.get("capturable"))
                        state["step"] = (torch.zeros((), dtype=torch.float32, device=parameter.device)
                                         if fused_or_capturable else torch.tensor(0.0, dtype=torch.float32))
                        state["exp_avg"] = torch.zeros_like(parameter)
                        state["exp_avg_sq"] = torch.zeros_like(parameter)
                        if group["amsgrad"]:
                            state["max_exp_avg_sq"] = torch.zeros_like(parameter)
        gradients = [p.grad for p in self._trained]
        if len(gradients) != len(self._gradients) or any(g is not h for g, h in zip(gradients, self._gradients)):
            module = self.module
            self._critic = _CriticViews(module.critic, self.obs_dim, with_gradients=True)
            self._target_critic = _CriticViews(module.target_critic, self.obs_dim, with_gradients=False)
            self._actor = _ActorViews(self.actor, with_gradients=True)
            self._target_actor = _ActorViews(self.target_actor, with_gradients=False)
            self._gradients = gradients
        for optimizer in (self.critic_optimizer, self.actor_optimizer):
            self._adam_plans[optimizer] = self._fused_adam_plan(optimizer)
        self._outer_precision = _ONEDNN_MATMUL.fp32_precision

    def _hidden_products(self) -> None:
        """The products from here on are hidden-layer ones: the reduced precision, if any."""
        if self._reduced_precision is not None:
            _ONEDNN_MATMUL.fp32_precision = self._reduced_precision

    def restore_precision(self) -> None:
        """Products from here on in the process's own precision (as found at :meth:`prepare`)."""
        if self._reduced_precision is not None:
            _ONEDNN_MATMUL.fp32_precision = self._outer_precision

    @staticmethod
    def _fused_adam_plan(optimizer: torch.optim.Optimizer) -> list[tuple[dict, list[list[Tensor]], Tensor]] | None:
        """Per parameter group, the fused Adam kernel's tensor lists and one tensor that
        holds every parameter's step count (``state["step"]`` are views of it, so one
        ``add_`` counts a step for all); None where ``Optimizer.step`` must run instead."""
        plan = []
        for group in optimizer.param_groups:
            if not group.get("fused") or group["amsgrad"] or group.get("decoupled_weight_decay"):
                return None
            params = group["params"]
            if not params:
                continue
            state = [optimizer.state[p] for p in params]
            steps = [s["step"] for s in state]
            counter = steps[0]._base
            if counter is None or any(step._base is not counter for step in steps) or counter.numel() != len(steps):
                counter = torch.stack(steps)  # each parameter keeps its own count
                for index, entry in enumerate(state):
                    entry["step"] = counter[index]
            lists = [params, [p.grad for p in params], [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state],
                     [], [s["step"] for s in state]]
            plan.append((group, lists, counter))
        return plan

    def _adam(self, optimizer: torch.optim.Optimizer) -> None:
        """One Adam step from the gradients in place: the fused kernel called directly
        (what ``Adam(fused=True).step`` does without its per-call Python), else ``step``."""
        plan = self._adam_plans[optimizer]
        if plan is None:
            optimizer.step()
            return
        for group, lists, counter in plan:
            counter.add_(1)
            beta1, beta2 = group["betas"]
            torch._fused_adam_(*lists, amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2,
                               weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])

    # ------------------------------------------------------------------ forward passes

    def _actor_forward(self, actor: _ActorViews, obs: Tensor) -> list[Tensor]:
        """Every layer's output (after its activation); the last is the action in [-1, 1]."""
        outputs = []
        h = obs
        last = len(actor.layers) - 1
        for index, (_, weight_t, bias, _, _) in enumerate(actor.layers):
            hidden = 0 < index < last  # a product between two hidden layers
            if hidden:
                self._hidden_products()
            h = torch.addmm(bias, h, weight_t)
            if hidden:
                self.restore_precision()
            if index < last:
                self.actor_activate(h)
            else:
                h.tanh_()
            outputs.append(h)
        return outputs

    def _critics_forward(self, critic: _CriticViews, obs: Tensor, action: Tensor) -> tuple[Tensor, list[Tensor]]:
        """All critics' inputs to each layer, ``[x, h_1 .. h_L]`` (h as ``[n, batch, width]``),
        and their Q-values, ``[n, batch, 1]``."""
        x = torch.cat([obs, action], dim=1)
        h = torch.baddbmm(critic.first_bias, x.expand(critic.n, *x.shape), critic.first_weight)
        self.critic_activate(h)
        inputs = [x, h]
        self._hidden_products()
        for weight, bias, _ in critic.hidden:
            h = torch.baddbmm(bias, h, weight)
            self.critic_activate(h)
            inputs.append(h)
        self.restore_precision()
        q = torch.baddbmm(critic.head_bias, h, critic.head_weight_t)
        return q, inputs

    def _first_critic_forward(self, critic: _CriticViews, obs: Tensor, action: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Q_1(s, a) as ``[batch, 1]`` and its hidden outputs ``[h_1 .. h_L]``."""
        x = torch.cat([obs, action], dim=1)
        h = torch.addmm(critic.first_bias_1, x, critic.first_weight_1)
        self.critic_activate(h)
        hidden = [h]
        self._hidden_products()
        for weight, bias, _ in critic.hidden_1:
            h = torch.addmm(bias, h, weight)
            self.critic_activate(h)
            hidden.append(h)
        self.restore_precision()
        return torch.addmm(critic.head_bias_1, h, critic.head_weight_1_t), hidden

    # ------------------------------------------------------------------ one update

    @torch.no_grad()
    @_restores_precision
    def target(self, next_obs: Tensor, rewards: Tensor, discounts: Tensor, noise: Tensor | None,
               updates: int = 1) -> Tensor:
        """``y`` as ``[batch, 1]``; ``discounts`` is ``gamma (1 - terminated)``. The rows may
        be ``updates`` updates' minibatches stacked, as long as the target networks do not
        change between those updates; each adds its mean target Q to the totals."""
        next_action = self._actor_forward(self._target_actor, next_obs)[-1]
        if noise is not None:
            next_action.add_(noise).clamp_(-1.0, 1.0)
        next_q, _ = self._critics_forward(self._target_critic, next_obs, next_action)
        next_q = next_q.amin(0)
        self._target_mean.add_(next_q.sum(), alpha=updates / next_q.shape[0])
        return torch.addcmul(rewards, discounts, next_q)

    @torch.no_grad()
    @_restores_precision
    def critic_step(self, obs: Tensor, actions: Tensor, td_target: Tensor) -> None:
        """One gradient step of ``sum_i mean_b (Q_i(s, a) - y)^2``; adds the loss and the
        mean Q to the totals."""
        critic = self._critic
        q, inputs = self._critics_forward(critic, obs, actions)
        error = q - td_target
        batch = obs.shape[0]
        self._q_mean.add_(q.sum(), alpha=1.0 / q.numel())
        self._critic_loss.add_(torch.vdot(error.view(-1), error.view(-1)), alpha=1.0 / batch)
        grad = error.mul_(2.0 / batch)  # dL/dQ_i, [n, batch, 1]
        # head: Q_i = h_L w_i + c_i
        h = inputs[-1]
        torch.bmm(grad.transpose(1, 2), h, out=critic.head_weight_grad)
        torch.sum(grad, 1, out=critic.head_bias_grad)
        grad = self.critic_gradient(grad * critic.head_weight, h)
        # hidden layers, last to first: h_{k+1} = act(h_k W_k + b_k)
        self._hidden_products()
        for k in range(len(critic.hidden) - 1, -1, -1):
            _, _, weight_t = critic.hidden[k]
            weight_grad, bias_grad = critic.hidden_grads[k]
            h = inputs[k + 1]
            torch.bmm(h.transpose(1, 2), grad, out=weight_grad)
            torch.sum(grad, 1, keepdim=True, out=bias_grad)
            grad = self.critic_gradient(torch.bmm(grad, weight_t), h)
        self.restore_precision()
        # first layer: all critics read x; critic i's columns are i * width .. (i + 1) * width
        x = inputs[0]
        x_t = x.t()
        first_grad = torch.bmm(x_t.expand(critic.n, *x_t.shape), grad)
        critic.first_weight_grad.copy_(first_grad.transpose(0, 1))
        torch.sum(grad, 1, out=critic.first_bias_grad)
        self._adam(self.critic_optimizer)

    @torch.no_grad()
    @_restores_precision
    def actor_step(self, obs: Tensor) -> None:
        """One gradient step of ``-mean_b Q_1(s, mu(s))``, then the Polyak update of the
        targets; adds the actor loss to the totals."""
        critic, actor = self._critic, self._actor
        outputs = self._actor_forward(actor, obs)
        action = outputs[-1]
        q, hidden = self._first_critic_forward(critic, obs, action)
        batch = obs.shape[0]
        self._actor_loss.add_(q.sum(), alpha=-1.0 / batch)
        # dL/da through critic 1, none of whose weights change here
        grad = self.critic_gradient((critic.head_weight_1 * (-1.0 / batch)).expand(batch, -1), hidden[-1])
        self._hidden_products()
        for k in range(len(critic.hidden_1) - 1, -1, -1):
            grad = self.critic_gradient(grad @ critic.hidden_1[k][2], hidden[k])
        self.restore_precision()
        grad = grad @ critic.action_weight_1_t
        # through the actor: the output layer's tanh, then each Linear and activation
        grad = _tanh_gradient(grad, action)
        last = len(actor.layers) - 1
        for k in range(last, -1, -1):
            weight, _, _, weight_grad, bias_grad = actor.layers[k]
            layer_input = outputs[k - 1] if k > 0 else obs
            hidden = 0 < k < last  # this layer's products are between two hidden layers
            if hidden:
                self._hidden_products()
            torch.mm(grad.t(), layer_input, out=weight_grad)
            torch.sum(grad, 0, out=bias_grad)
            if k > 0:
                grad = self.actor_gradient(grad @ weight, layer_input)
            if hidden:
                self.restore_precision()
        self._adam(self.actor_optimizer)
        torch._foreach_lerp_(self.targets, self.online, self.tau)
