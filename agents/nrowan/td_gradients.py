"""The gradient of NROWAN-DQN's loss for an MLP Q-network, written out by hand.

At the paper's settings (batch 32, 128-128 network, one update per env step) the update's
arithmetic is tiny and its cost is the number of tensor operations: autograd records a
node per forward operation and runs a backward function per node, about three times the
operations of the forward pass. This module computes the same gradient with one matrix
product per weight, one for each layer's input gradient and one elementwise op per
activation, writing straight into the parameters' ``.grad`` tensors (views of one flat
buffer, see :mod:`agents.common.flat_parameters`). ``NROWANTorchLearner.compute_loss_for_module``
is the same loss for autograd; the tests check that both give the same gradients.

For a layer ``z = h W^T + b`` with noisy ``W = mu_w + sigma_w * (eps_out eps_in^T)`` and
``b = mu_b + sigma_b * eps_out``, given ``g = dL/dz``:

    dL/dmu_w = g^T h        dL/dsigma_w = (g^T h) * (eps_out eps_in^T)
    dL/dmu_b = sum_i g_i    dL/dsigma_b = (sum_i g_i) * eps_out
    dL/dh    = g W          (through the activation to the layer below)

The loss is ``mean_i (Q(s_i, a_i) - y_i)^2 + k * D`` with ``D`` the output layer's
``(sum |sigma_w| + sum |sigma_b|) / ((p* + 1) * N_a)``, whose gradient is
``k * sign(sigma) / ((p* + 1) * N_a)``.
"""

from __future__ import annotations

import torch

from agents.common.noisy import NoisyLinear
from agents.nrowan.nrowan_rl_module import QNetwork

_ACTIVATION_BACKWARD = {
    # each from the activation's output h: relu' = [h > 0], tanh' = 1 - h^2, elu' = h + 1 below 0
    "relu": lambda grad, h: torch.ops.aten.threshold_backward(grad, h, 0),
    "tanh": lambda grad, h: torch.ops.aten.tanh_backward(grad, h),
    "elu": lambda grad, h: torch.ops.aten.elu_backward(grad, 1.0, 1.0, 1.0, True, h),
}


def noise_level_scale(layer: NoisyLinear) -> float:
    """``1 / ((p* + 1) * N_a)``: the normaliser of a noisy layer's noise level D."""
    fan_out, fan_in = layer.weight_sigma.shape
    return 1.0 / ((fan_in + 1) * fan_out)


def noise_level(layer: NoisyLinear) -> torch.Tensor:
    """D of a noisy layer: (sum |sigma_w| + sum |sigma_b|) / ((p* + 1) * N_a)."""
    return (layer.weight_sigma.abs().sum() + layer.bias_sigma.abs().sum()) * noise_level_scale(layer)


class TDGradients:
    """The gradient of ``TD + k * D`` for one :class:`QNetwork`, by hand.

    Built once per network: it keeps the layers' parameters and gradient tensors (created
    as zeros where missing), and each call overwrites those gradients. With
    :func:`~agents.common.flat_parameters.flatten_parameters` they are views of one flat
    gradient, which an optimizer of the flat Parameter then reads.
    """

    def __init__(self, network: QNetwork):
        self.network = network
        self.activation_backward = _ACTIVATION_BACKWARD[network.activation_name]
        self.layers = []
        for layer in network.layers:
            noisy = isinstance(layer, NoisyLinear)
            parameters = ((layer.weight_mu, layer.bias_mu, layer.weight_sigma, layer.bias_sigma) if noisy
                          else (layer.weight, layer.bias))
            for parameter in parameters:
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
            self.layers.append((noisy, parameters, tuple(parameter.grad for parameter in parameters)))
        output = network.output_layer
        self.level_scale = noise_level_scale(output) if isinstance(output, NoisyLinear) else 0.0

    @torch.no_grad()
    def __call__(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        targets: torch.Tensor,
        noise: list[tuple[torch.Tensor, torch.Tensor]] | None,
        noise_weight: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Write the gradient of ``TD + noise_weight * D`` into the network's ``.grad`` tensors.

        Args:
            obs: ``[batch, obs_dim]`` float observations.
            actions: ``[batch]`` int64 actions taken.
            targets: ``[batch]`` TD targets ``y``.
            noise: the factors of every noisy layer (from ``network.sample_noise()``) for a
                noisy forward pass, or None for the mean weights (DQN, or noise switched off).
            noise_weight: ``k``, the weight of the output layer's noise level D (None or 0: no D term).

        Returns:
            ``(td_loss, q_taken, D)``: the TD loss, ``Q(s_i, a_i)`` and the output layer's
            noise level (None when the output layer is not noisy), all detached.
        """
        last = len(self.layers) - 1
        activate = self.network._activate
        inputs, weights, factors = [], [], []
        h, drawn = obs, 0
        for index, (noisy, parameters, _) in enumerate(self.layers):
            factor = None
            if noisy and noise is not None:
                weight_mu, bias_mu, weight_sigma, bias_sigma = parameters
                eps_in, eps_out = noise[drawn]
                factor = (torch.outer(eps_out, eps_in), eps_out)
                weight = torch.addcmul(weight_mu, weight_sigma, factor[0])
                bias = torch.addcmul(bias_mu, bias_sigma, eps_out)
            else:
                weight, bias = parameters[0], parameters[1]
            drawn += noisy
            inputs.append(h)
            weights.append(weight)
            factors.append(factor)
            h = torch.addmm(bias, h, weight.t())
            if index < last:
                h = activate(h)
        batch = obs.shape[0]
        index = actions.reshape(-1, 1)
        q_taken = h.gather(1, index).squeeze(1)
        error = q_taken - targets
        td_loss = error.dot(error) / batch
        grad = torch.zeros_like(h).scatter_(1, index, error.mul(2.0 / batch).unsqueeze(1))
        for position in range(last, -1, -1):
            noisy, _, gradients = self.layers[position]
            weight_grad, bias_grad = gradients[0], gradients[1]
            torch.mm(grad.t(), inputs[position], out=weight_grad)
            torch.sum(grad, 0, out=bias_grad)
            if noisy:
                if factors[position] is not None:
                    outer, eps_out = factors[position]
                    torch.mul(weight_grad, outer, out=gradients[2])
                    torch.mul(bias_grad, eps_out, out=gradients[3])
                else:  # the mean weights: sigma does not enter the TD term
                    gradients[2].zero_()
                    gradients[3].zero_()
            if position > 0:
                grad = self.activation_backward(grad.mm(weights[position]), inputs[position])
        noisy, parameters, gradients = self.layers[-1]
        if not noisy:
            return td_loss, q_taken, None
        weight_sigma, bias_sigma = parameters[2], parameters[3]
        level = noise_level(self.network.output_layer)
        if isinstance(noise_weight, torch.Tensor):  # k as a tensor: no host sync
            scale = noise_weight * self.level_scale
            gradients[2].addcmul_(weight_sigma.sign(), scale)
            gradients[3].addcmul_(bias_sigma.sign(), scale)
        elif noise_weight:
            gradients[2].add_(weight_sigma.sign(), alpha=float(noise_weight) * self.level_scale)
            gradients[3].add_(bias_sigma.sign(), alpha=float(noise_weight) * self.level_scale)
        return td_loss, q_taken, level
