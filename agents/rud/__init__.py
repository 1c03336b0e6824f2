"""RUD, TD3 and DDPG on RLlib's new API stack (one implementation, three presets).

    from agents.rud import RUD, RUDConfig
    algo = RUDConfig().environment("HalfCheetah-v5").build_algo()
"""

from ray.tune.registry import register_trainable

from agents.rud.rud import DDPG, RUD, TD3, DDPGConfig, RUDConfig, TD3Config

# so that tune.Tuner("RUD", ...) and friends find them by name
for _algorithm in (RUD, TD3, DDPG):
    register_trainable(_algorithm.__name__, _algorithm)

__all__ = ["RUD", "RUDConfig", "TD3", "TD3Config", "DDPG", "DDPGConfig"]
