"""RLModule of NROWAN-DQN, NoisyNet-DQN and DQN: a Q-network and its target copy.

The network is an MLP over the observation whose last ``noisy_layers`` fully connected
layers are :class:`~agents.common.noisy.NoisyLinear` (NoisyNet-DQN and NROWAN-DQN; the
classic-control network of the paper is 128-128 with the last two layers noisy), or plain
``nn.Linear`` with epsilon-greedy exploration (DQN). Image observations (stacked frames,
channels first, e.g. ``raysmith/Pong-v5``'s ``uint8[4, 84, 84]``) go through DQN's
convolutional torso first (:class:`ConvQNetwork`); its fully connected head is the same MLP.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.utils import make_target_network
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, TargetNetworkAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn

from agents.common.networks import activation_class
from agents.common.noisy import NoiseStream, NoisyLinear, factorised_noise
from agents.common.transition_env_runner import is_image_space

Q_VALUES = "q_values"

ACTIVATION_FUNCTIONS = {"relu": torch.relu, "tanh": torch.tanh, "elu": nn.functional.elu}
"""The functional form of each of :data:`~agents.common.networks.ACTIVATIONS`."""

DEFAULT_MODEL_CONFIG = {
    "hidden": [128, 128],
    "conv_filters": [[32, 8, 4], [64, 4, 2], [64, 3, 1]],
    "activation": "relu",
    "noisy": True,
    "noisy_layers": 2,
    "bias_sigma_fan": "out",
    "sigma_0": 0.4,
    "epsilon_start": 1.0,
    "epsilon_final": 0.01,
    "epsilon_decay": 500.0,
    "evaluation_noise": False,
}
"""``model_config`` keys and defaults (the paper's classic-control network)."""


class QNetwork(nn.Module):
    """Q(s, .) for every action: an MLP whose last ``noisy_layers`` layers may be noisy."""

    def __init__(self, obs_dim: int, num_actions: int, hidden: Sequence[int] = (128, 128), activation: str = "relu",
                 noisy_layers: int = 2, sigma_0: float = 0.4, bias_sigma_fan: str = "out"):
        super().__init__()
        sizes = [obs_dim, *hidden, num_actions]
        num_layers = len(sizes) - 1
        if not 0 <= noisy_layers <= num_layers:
            raise ValueError(f"noisy_layers must be between 0 and the number of layers ({num_layers}), got {noisy_layers}")
        self.layers = nn.ModuleList()
        for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            noisy = index >= num_layers - noisy_layers
            self.layers.append(NoisyLinear(fan_in, fan_out, sigma_0, bias_sigma_fan) if noisy else nn.Linear(fan_in, fan_out))
        self.activation_name = activation
        self.activation = activation_class(activation)()
        self._activate = ACTIVATION_FUNCTIONS[activation]
        self.noise_shapes = [(layer.in_features, layer.out_features) for _, layer in self.noisy_layers]
        """``(in, out)`` of each noisy layer, input side first: the shapes :meth:`sample_noise` draws."""
        self._noise = NoiseStream(self.noise_shapes)

    @property
    def noisy_layers(self) -> list[tuple[int, NoisyLinear]]:
        """``(position, layer)`` of every noisy layer, input side first."""
        return [(index, layer) for index, layer in enumerate(self.layers) if isinstance(layer, NoisyLinear)]

    @property
    def output_layer(self) -> nn.Module:
        return self.layers[-1]

    def sample_noise(self, generator: torch.Generator | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fresh factorised noise ``(f(eps_in), f(eps_out))`` for every noisy layer: from
        ``generator`` if given, else the network's own :class:`NoiseStream` (torch's global
        generator, drawn for many forward passes at a time)."""
        first = self.layers[0]
        device = (first.weight_mu if isinstance(first, NoisyLinear) else first.weight).device
        if generator is not None:
            return factorised_noise(self.noise_shapes, generator, device)
        return self._noise(device)

    def forward(self, obs: torch.Tensor, noisy: bool | None = None,
                noise: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Q-values ``[batch, num_actions]``; ``noisy`` overrides the noisy layers' mode;
        ``noise`` (from :meth:`sample_noise`) replaces a fresh draw. Layers are called
        directly, without module hooks: this runs once per env step and twice per update."""
        noisy = self.training if noisy is None else noisy
        if noisy and noise is None and self.noise_shapes:
            noise = self.sample_noise()
        h, drawn = obs, 0
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            if isinstance(layer, NoisyLinear):
                h = layer.forward(h, noisy, noise[drawn] if noisy else None)
                drawn += 1
            else:
                h = layer.forward(h)
            if index < last:
                h = self._activate(h)
        return h


class ConvQNetwork(nn.Module):
    """Q(s, .) from stacked frames ``[batch, channels, height, width]`` (uint8 pixels are
    scaled to [0, 1]): convolutions with ReLU (DQN's torso: 32 8x8 stride 4, 64 4x4 stride 2,
    64 3x3 stride 1), then a :class:`QNetwork` head whose last ``noisy_layers`` are noisy
    (NoisyNet-DQN on Atari: 512 hidden units, both head layers noisy)."""

    def __init__(self, obs_shape: Sequence[int], num_actions: int,
                 conv_filters: Sequence[Sequence[int]] = ((32, 8, 4), (64, 4, 2), (64, 3, 1)),
                 hidden: Sequence[int] = (512,), activation: str = "relu", noisy_layers: int = 2,
                 sigma_0: float = 0.4, bias_sigma_fan: str = "out"):
        super().__init__()
        channels = int(obs_shape[0])
        layers: list[nn.Module] = []
        for out_channels, kernel, stride in conv_filters:
            layers += [nn.Conv2d(channels, int(out_channels), int(kernel), int(stride)), nn.ReLU()]
            channels = int(out_channels)
        self.torso = nn.Sequential(*layers)
        with torch.no_grad():
            features = self.torso(torch.zeros(1, *obs_shape)).numel()
        if features == 0:
            raise ValueError(f"conv_filters {list(conv_filters)} leave nothing of observations shaped {tuple(obs_shape)}")
        self.head = QNetwork(features, num_actions, hidden, activation, noisy_layers, sigma_0, bias_sigma_fan)

    @property
    def noisy_layers(self) -> list[tuple[int, NoisyLinear]]:
        """``(position in the head, layer)`` of every noisy layer."""
        return self.head.noisy_layers

    @property
    def output_layer(self) -> nn.Module:
        return self.head.output_layer

    @property
    def noise_shapes(self) -> list[tuple[int, int]]:
        return self.head.noise_shapes

    def sample_noise(self, generator: torch.Generator | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.head.sample_noise(generator)

    def forward(self, obs: torch.Tensor, noisy: bool | None = None,
                noise: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        pixels = obs.float().div_(255.0) if obs.dtype == torch.uint8 else obs.float()
        return self.head(self.torso(pixels).flatten(1), noisy, noise)


def epsilon_at(step: float, start: float, final: float, decay: float) -> float:
    """DQN's exploration rate after ``step`` env steps: exponential decay from start to final."""
    if decay <= 0:
        return final
    return final + (start - final) * math.exp(-step / decay)


class NROWANTorchRLModule(TorchRLModule, InferenceOnlyAPI, TargetNetworkAPI):
    """Q(s, .) and its target copy for NROWAN-DQN, NoisyNet-DQN and DQN.

    Acting while training: greedy on freshly noisy Q-values (noisy networks), or
    epsilon-greedy on Q (DQN, epsilon decaying with the env steps ``t``). Evaluation:
    greedy on the mean weights, or, with ``evaluation_noise``, as the agent acts while
    training (fresh noise; DQN at ``epsilon_final``).
    """

    def setup(self) -> None:
        config = {**DEFAULT_MODEL_CONFIG, **(self.model_config or {})}
        if not isinstance(self.action_space, gym.spaces.Discrete):
            raise ValueError(f"needs a discrete action space; got {self.action_space}")
        if not isinstance(self.observation_space, gym.spaces.Box):
            raise ValueError(f"needs a Box observation space; got {self.observation_space}")
        self.obs_dim = int(np.prod(self.observation_space.shape))
        self.image = is_image_space(self.observation_space)
        self.obs_shape = tuple(self.observation_space.shape) if self.image else (self.obs_dim,)
        """Observation shape as the replay buffer stores it (images kept whole, vectors flat)."""
        self.obs_dtype = torch.uint8 if self.image and self.observation_space.dtype == np.uint8 else torch.float32
        self.num_actions = int(self.action_space.n)
        self.noisy = bool(config["noisy"])
        self.epsilon = (float(config["epsilon_start"]), float(config["epsilon_final"]), float(config["epsilon_decay"]))
        self.evaluation_noise = bool(config["evaluation_noise"])
        if self.noisy and int(config["noisy_layers"]) < 1:
            raise ValueError("noisy networks need noisy_layers >= 1 (noisy: false is DQN with epsilon-greedy)")
        noise_settings = {"noisy_layers": int(config["noisy_layers"]) if self.noisy else 0,
                          "sigma_0": float(config["sigma_0"]), "bias_sigma_fan": config["bias_sigma_fan"]}
        if self.image:
            self.q = ConvQNetwork(self.obs_shape, self.num_actions, config["conv_filters"], config["hidden"],
                                  config["activation"], **noise_settings)
        else:
            self.q = QNetwork(self.obs_dim, self.num_actions, config["hidden"], config["activation"], **noise_settings)

    def _observations(self, batch: dict[str, Any], key: str = Columns.OBS) -> torch.Tensor:
        obs = batch[key]
        return obs if self.image else obs.reshape(obs.shape[0], -1).float()

    def act(self, obs: torch.Tensor, t: float, explore: bool) -> torch.Tensor:
        """Actions ``[batch]`` (int64) for observations ``[batch, *obs_shape]`` after ``t`` env steps."""
        with torch.no_grad():
            if self.noisy:
                return self.q(obs, noisy=explore or self.evaluation_noise).argmax(-1)
            epsilon = epsilon_at(t, *self.epsilon) if explore else (self.epsilon[1] if self.evaluation_noise else 0.0)
            actions = self.q(obs).argmax(-1)
            if epsilon > 0:
                explore_mask = torch.rand(actions.shape[0], device=obs.device) < epsilon
                random_actions = torch.randint(0, self.num_actions, actions.shape, device=obs.device)
                actions = torch.where(explore_mask, random_actions, actions)
            return actions

    def _forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.ACTIONS: self.act(self._observations(batch), 0.0, explore=False)}

    def _forward_exploration(self, batch: dict[str, Any], t: int = 0, **kwargs) -> dict[str, Any]:
        return {Columns.ACTIONS: self.act(self._observations(batch), float(t), explore=True)}

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        """Q(s, .) with fresh noise for every forward pass (noisy networks)."""
        return {Q_VALUES: self.q(self._observations(batch), noisy=self.noisy)}

    def forward_target(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Q_target(s, .) with fresh noise (noisy networks), for the TD targets."""
        return {Q_VALUES: self.target_q(self._observations(batch), noisy=self.noisy)}

    def make_target_networks(self) -> None:
        self.target_q = make_target_network(self.q)

    def get_target_network_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.q, self.target_q)]

    def get_non_inference_attributes(self) -> list[str]:
        return ["target_q"]
