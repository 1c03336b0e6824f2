"""ERL and RIM: evolutionary populations beside a DDPG agent, on Ray and RLlib.

    from agents.rim import RIMConfig
    algo = RIMConfig().environment("Hopper-v5").build_algo()
    algo.train()   # one generation
"""

from ray.tune.registry import register_trainable

from agents.rim.erl import ERL, ERLConfig
from agents.rim.rim import RIM, RIMConfig

# so that tune.Tuner("RIM", ...) and tune.Tuner("ERL", ...) find them by name
for _algorithm in (ERL, RIM):
    register_trainable(_algorithm.__name__, _algorithm)

__all__ = ["ERL", "ERLConfig", "RIM", "RIMConfig"]
