"""RL algorithms raysmith adds to RLlib (new API stack), one package per family.

:data:`ALGORITHMS` maps a name usable as the ``rl`` pipeline's ``algorithm:`` to the
``module:Class`` of its :class:`ray.rllib.algorithms.Algorithm`. Names not listed here are
looked up in RLlib's own registry (PPO, DQN, SAC, ...). An algorithm class may define
``check_spaces(observation_space, action_space) -> str | None`` to refuse environments it
cannot learn, before anything is built.
"""

ALGORITHMS: dict[str, str] = {
    "RUD": "agents.rud:RUD",
    "TD3": "agents.rud:TD3",
    "DDPG": "agents.rud:DDPG",
    "NROWAN": "agents.nrowan:NROWAN",
    "NoisyNetDQN": "agents.nrowan:NoisyNetDQN",
    "EpsilonGreedyDQN": "agents.nrowan:EpsilonGreedyDQN",
    "ERL": "agents.rim:ERL",
    "RIM": "agents.rim:RIM",
}

from agents.envs import register_environments  # noqa: E402  (raysmith/Pong-v5 and friends)

register_environments()
