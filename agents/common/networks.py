"""Networks of the deterministic actor-critic family (DDPG, TD3, RUD, and RIM/ERL's actors).

:class:`FusedCritics` holds n Q-networks of the same shape as stacked weights, so the twin
critics of clipped double Q cost one wide matmul for the first layer and one batched
matmul per hidden layer instead of two separate networks' worth of small kernels.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU}


def activation_problem(name: object) -> str | None:
    """Why ``name`` is not one of :data:`ACTIVATIONS`, naming the allowed ones, or None."""
    if name in ACTIVATIONS:
        return None
    return f"activation must be one of {', '.join(ACTIVATIONS)}; got {name!r}"


def activation_class(name: str) -> type[nn.Module]:
    """The hidden-layer activation called ``name``; a ValueError names the allowed ones."""
    problem = activation_problem(name)
    if problem:
        raise ValueError(problem)
    return ACTIVATIONS[name]


def mlp(sizes: Sequence[int], activation: str = "relu", output_activation: type[nn.Module] | None = None) -> nn.Sequential:
    """Linear layers between ``sizes``, ``activation`` between them, PyTorch's default init."""
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(sizes) - 2:
            layers.append(activation_class(activation)())
    if output_activation is not None:
        layers.append(output_activation())
    return nn.Sequential(*layers)


class DeterministicActor(nn.Module):
    """mu(s): observation -> action in [-1, 1] (tanh output; the env runner rescales to bounds)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256), activation: str = "relu"):
        super().__init__()
        self.net = mlp([obs_dim, *hidden, act_dim], activation, output_activation=nn.Tanh)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


class FusedCritics(nn.Module):
    """``n`` independent Q(s, a) networks evaluated together.

    Parameters are stored stacked: the first layer as one ``[in, n * h1]`` matrix (all
    critics read the same input), later hidden layers as ``[n, h_i, h_{i+1}]`` for a batched
    matmul, and the scalar head as ``[n, 1, h_last]`` (a dot product). Each critic is
    initialised exactly like an ``nn.Linear`` stack, independently of the others.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256), num_critics: int = 2,
                 activation: str = "relu"):
        super().__init__()
        if not hidden:
            raise ValueError("FusedCritics needs at least one hidden layer")
        self.num_critics = n = num_critics
        self.hidden = tuple(hidden)
        self.activation = activation_class(activation)()
        in_dim = obs_dim + act_dim
        self.first_weight = nn.Parameter(torch.empty(in_dim, n * hidden[0]))
        self.first_bias = nn.Parameter(torch.empty(n * hidden[0]))
        self.hidden_weights = nn.ParameterList(
            nn.Parameter(torch.empty(n, fan_in, fan_out)) for fan_in, fan_out in zip(hidden[:-1], hidden[1:])
        )
        self.hidden_biases = nn.ParameterList(nn.Parameter(torch.empty(n, 1, fan_out)) for fan_out in hidden[1:])
        self.head_weight = nn.Parameter(torch.empty(n, 1, hidden[-1]))
        self.head_bias = nn.Parameter(torch.empty(n, 1))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # nn.Linear's default: weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        def uniform_(tensor: torch.Tensor, fan_in: int) -> None:
            bound = 1.0 / math.sqrt(fan_in)
            tensor.uniform_(-bound, bound)

        in_dim = self.first_weight.shape[0]
        uniform_(self.first_weight, in_dim)
        uniform_(self.first_bias, in_dim)
        for weight, bias in zip(self.hidden_weights, self.hidden_biases):
            uniform_(weight, weight.shape[1])
            uniform_(bias, weight.shape[1])
        uniform_(self.head_weight, self.hidden[-1])
        uniform_(self.head_bias, self.hidden[-1])

    def forward(self, obs: torch.Tensor, action: torch.Tensor, *, first_only: bool = False,
                detach_parameters: bool = False) -> torch.Tensor:
        """Q-values of shape ``[n, batch]`` (``[1, batch]`` with ``first_only``).

        ``detach_parameters`` lets gradients flow to the inputs (the actor's actions) but
        computes none for the critics' own weights: the actor update needs dQ/da only.
        """
        n = 1 if first_only else self.num_critics
        width = self.hidden[0]

        def use(parameter: torch.Tensor) -> torch.Tensor:
            return parameter.detach() if detach_parameters else parameter

        x = torch.cat([obs, action], dim=-1)
        h = torch.addmm(use(self.first_bias)[: n * width], x, use(self.first_weight)[:, : n * width])
        h = self.activation(h).view(x.shape[0], n, width).transpose(0, 1)
        for weight, bias in zip(self.hidden_weights, self.hidden_biases):
            h = self.activation(torch.baddbmm(use(bias)[:n], h, use(weight)[:n]))
        return (h * use(self.head_weight)[:n]).sum(-1) + use(self.head_bias)[:n]

    def single(self, index: int) -> nn.Sequential:
        """Critic ``index`` as a plain ``nn.Sequential`` of ``nn.Linear`` layers (a copy)."""
        width = self.hidden[0]
        layers: list[nn.Module] = []
        sizes = [self.first_weight.shape[0], *self.hidden, 1]
        weights = [self.first_weight[:, index * width : (index + 1) * width].T]
        biases = [self.first_bias[index * width : (index + 1) * width]]
        weights += [w[index].T for w in self.hidden_weights] + [self.head_weight[index]]
        biases += [b[index, 0] for b in self.hidden_biases] + [self.head_bias[index]]
        for position, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            linear = nn.Linear(fan_in, fan_out)
            with torch.no_grad():
                linear.weight.copy_(weights[position])
                linear.bias.copy_(biases[position])
            layers.append(linear)
            if position < len(sizes) - 2:
                layers.append(type(self.activation)())
        return nn.Sequential(*layers)


class RunningNorm(nn.Module):
    """Observation normaliser with running mean and variance (Chan et al.'s parallel update).

    Statistics are buffers: they travel with the module's weights to EnvRunners and into
    checkpoints. ``update`` is called by the Learner on raw observations; ``forward``
    normalises and clips to ``[-clip, clip]``.
    """

    def __init__(self, dim: int, clip: float = 10.0, epsilon: float = 1e-8):
        super().__init__()
        self.clip = clip
        self.epsilon = epsilon
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))
        # float32 copies used on the hot path, refreshed by every update
        self.register_buffer("shift", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    @torch.no_grad()
    def update(self, batch: torch.Tensor) -> None:
        batch = batch.to(torch.float64).reshape(-1, self.mean.shape[0])
        n = batch.shape[0]
        if n == 0:
            return
        batch_mean = batch.mean(0)
        batch_var = batch.var(0, unbiased=False)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.var.copy_((self.var * self.count + batch_var * n + delta.pow(2) * self.count * n / total) / total)
        self.count.copy_(total)
        self.shift.copy_(self.mean.float())
        self.scale.copy_((self.var + self.epsilon).rsqrt().float())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return ((obs - self.shift) * self.scale).clamp(-self.clip, self.clip)
