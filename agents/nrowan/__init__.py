"""NROWAN-DQN, NoisyNet-DQN and DQN on RLlib's new API stack (one implementation, three presets).

    from agents.nrowan import NROWAN, NROWANConfig
    algo = NROWANConfig().environment("CartPole-v0").build_algo()
"""

from ray.tune.registry import register_trainable

from agents.nrowan.nrowan import (
    DQNConfig,
    EpsilonGreedyDQN,
    NoisyNetDQN,
    NoisyNetDQNConfig,
    NROWAN,
    NROWANConfig,
)

# so that tune.Tuner("NROWAN", ...) and friends find them by name
for _algorithm in (NROWAN, NoisyNetDQN, EpsilonGreedyDQN):
    register_trainable(_algorithm.__name__, _algorithm)

__all__ = ["NROWAN", "NROWANConfig", "NoisyNetDQN", "NoisyNetDQNConfig", "EpsilonGreedyDQN", "DQNConfig"]
