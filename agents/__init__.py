"""RL algorithms raysmith adds to RLlib (new API stack), one package per family.

:data:`ALGORITHMS` maps a name usable as the ``rl`` pipeline's ``algorithm:`` to the
``module:Class`` of its :class:`ray.rllib.algorithms.Algorithm`. Names not listed here are
looked up in RLlib's own registry (PPO, DQN, SAC, ...).
"""

ALGORITHMS: dict[str, str] = {}
