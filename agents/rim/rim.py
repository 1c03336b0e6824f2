"""RIM: Recruitment-imitation Mechanism for evolutionary RL (Lü, Han, Zhou, Zhang; arXiv
1912.06310, Information Sciences 2021), on RLlib, built on :mod:`agents.rim.erl`.

The RL agent has two actors and one critic:

- pi_pg, trained by the deterministic policy gradient (DDPG's update, as in ERL);
- pi_ea, *recruited* from the population: after each generation's genetic step it moves
  towards the champion's weights by a soft update, theta_ea <- (1 - tau_0) theta_ea +
  tau_0 theta_champion (``recruitment="hard"``: a copy);
- it acts with whichever actor the critic scores higher in the state:
  pi_rl(s) = pi_pg(s) if Q(s, pi_pg(s)) >= Q(s, pi_ea(s)) else pi_ea(s) (plus exploration
  noise while training).

*Imitation* replaces ERL's weight copy into the population: every ``imitation_period``
generations, after the genetic step, the members in the slots of the ``imitation_fraction``
lowest-fitness members (where ERL would copy the agent; never an elite's copy) take
``imitation_steps`` Adam steps on (1/K) sum_k ||pi_member(s_k) - pi_rl(s_k)||^2 over K
replay states each, so members learn the agent's behaviour without receiving its weights
(the member's architecture could differ). Imitation starts once the critic has trained.

Ablations are switches: ``imitation=False``; ``acting="ea"`` (pi_ea only) or ``"pg"``
(pi_pg only); ``recruitment="hard"``. The paper's own values for tau_0, K and the
imitation schedule could not be read here; the defaults below are raysmith's and are
exposed for tuning. Also ours: the critic's TD target uses pi_pg's target network, as DDPG.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from agents.common.networks import DeterministicActor, FusedCritics
from agents.common.off_policy import set_provided
from agents.rim.erl import ERL, POPULATION, ERLConfig
from agents.rim.population import genome_of, load_genome, soft_update
from agents.rud.rud_learner import RUDTorchLearner
from agents.rud.rud_rl_module import DEFAULT_MODEL_CONFIG, RUDTorchRLModule

ACTING_MODES = ("critic", "pg", "ea")
RECRUITMENT_MODES = ("soft", "hard")


class RIMConfig(ERLConfig):
    """RIM: ERL's population and DDPG learner, plus recruitment and imitation."""

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class or RIM)
        self.recruitment_tau: float = 0.1
        """tau_0 of the soft recruitment update of pi_ea towards the champion."""
        self.recruitment: str = "soft"
        self.acting: str = "critic"
        """critic: the critic picks pi_pg or pi_ea per state; pg / ea: one actor only (ablations)."""
        self.imitation: bool = True
        self.imitation_period: int = 1
        """Generations between imitation rounds."""
        self.imitation_fraction: float = 0.3
        """Share of the population (lowest fitness, never an elite) that imitates pi_rl."""
        self.imitation_batch: int = 256
        """K: replay states per imitation step."""
        self.imitation_steps: int = 50
        self.imitation_lr: float = 1e-3
        self.sync_period = 0  # RIM's members imitate instead of receiving the RL actor's weights

    def training(
        self,
        *,
        recruitment_tau: float | None = NotProvided,
        recruitment: str | None = NotProvided,
        acting: str | None = NotProvided,
        imitation: bool | None = NotProvided,
        imitation_period: int | None = NotProvided,
        imitation_fraction: float | None = NotProvided,
        imitation_batch: int | None = NotProvided,
        imitation_steps: int | None = NotProvided,
        imitation_lr: float | None = NotProvided,
        **kwargs: Any,
    ) -> "RIMConfig":
        super().training(**kwargs)
        return set_provided(self, locals())

    def validate(self) -> None:
        super().validate()
        errors = []
        if self.acting not in ACTING_MODES:
            errors.append(f"acting must be one of {ACTING_MODES}, got {self.acting!r}")
        if self.recruitment not in RECRUITMENT_MODES:
            errors.append(f"recruitment must be one of {RECRUITMENT_MODES}, got {self.recruitment!r}")
        if not 0 < self.recruitment_tau <= 1:
            errors.append(f"recruitment_tau must be in (0, 1], got {self.recruitment_tau}")
        if not 0 <= self.imitation_fraction < 1:
            errors.append(f"imitation_fraction must be in [0, 1), got {self.imitation_fraction}")
        for name in ("imitation_period", "imitation_batch", "imitation_steps"):
            if int(getattr(self, name)) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if errors:
            raise ValueError("; ".join(errors))

    def get_default_rl_module_spec(self):
        from ray.rllib.core.rl_module.rl_module import RLModuleSpec

        return RLModuleSpec(module_class=RIMTorchRLModule)

    def get_default_learner_class(self) -> type:
        return RIMTorchLearner

    @property
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | {"acting": self.acting}


class RIMTorchRLModule(RUDTorchRLModule):
    """pi_pg (``actor``), pi_ea (``ea_actor``) and one critic; EnvRunners hold all three,
    since the critic chooses the action."""

    def setup(self) -> None:
        super().setup()
        config = {**DEFAULT_MODEL_CONFIG, **(self.model_config or {})}
        self.acting = config.get("acting", "critic")
        self.ea_actor = DeterministicActor(self.obs_dim, self.act_dim, config["actor_hidden"], config["activation"])
        self.ea_actor.load_state_dict(self.actor.state_dict())  # recruitment moves it from here
        if self.inference_only:  # the EnvRunners' copy needs the critic to choose
            self.critic = FusedCritics(self.obs_dim, self.act_dim, config["critic_hidden"],
                                       num_critics=2 if config["twin_q"] else 1, activation=config["activation"])

    def choose(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pi_rl(s) for normalised observations, and whether pi_pg was chosen, per state."""
        pg = self.actor(obs)
        if self.acting == "pg":
            return pg, torch.ones(obs.shape[0], dtype=torch.bool, device=obs.device)
        ea = self.ea_actor(obs)
        if self.acting == "ea":
            return ea, torch.zeros(obs.shape[0], dtype=torch.bool, device=obs.device)
        values = self.critic(torch.cat([obs, obs]), torch.cat([pg, ea]), first_only=True)[0]
        use_pg = values[: obs.shape[0]] >= values[obs.shape[0] :]
        return torch.where(use_pg[:, None], pg, ea), use_pg

    @torch.no_grad()
    def _forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.ACTIONS: self.choose(self._observations(batch))[0]}

    @torch.no_grad()
    def _forward_exploration(self, batch: dict[str, Any], t: int = 0, **kwargs) -> dict[str, Any]:
        obs = self._observations(batch)
        if t < self.learning_starts:
            return {Columns.ACTIONS: torch.rand(obs.shape[0], self.act_dim, device=obs.device) * 2 - 1}
        action = self.choose(obs)[0]
        noise = torch.randn_like(action) * self.exploration_noise
        return {Columns.ACTIONS: (action + noise).clamp(-1.0, 1.0)}

    def get_non_inference_attributes(self) -> list[str]:
        return ["target_actor", "target_critic"]


class RIMTorchLearner(RUDTorchLearner):
    """DDPG's updates of pi_pg and the critic, plus recruitment of pi_ea and imitation."""

    @torch.no_grad()
    def recruit(self, genome: torch.Tensor, tau: float) -> float:
        """theta_ea <- (1 - tau) theta_ea + tau theta_champion; returns the distance moved (L2)."""
        module = self.module[DEFAULT_MODULE_ID]
        champion = load_genome(self._scratch_actor(), genome)
        moved = soft_update(module.ea_actor, champion, tau)
        self._weights_seq_no += 1
        return moved

    def _scratch_actor(self) -> DeterministicActor:
        """An actor of the population's shape to load genomes into (its initialisation does
        not touch the global random state that exploration noise draws from)."""
        module = self.module[DEFAULT_MODULE_ID]
        config = {**DEFAULT_MODEL_CONFIG, **(self.config.model_config or {})}
        with torch.random.fork_rng(devices=[]):
            return DeterministicActor(module.obs_dim, module.act_dim, config["actor_hidden"], config["activation"])

    @torch.no_grad()
    def pg_share(self, obs: np.ndarray) -> float:
        """Share of these states where the critic prefers pi_pg (what the agent acted with)."""
        module = self.module[DEFAULT_MODULE_ID]
        if len(obs) == 0:
            return float("nan")
        states = module.obs_norm(torch.as_tensor(obs, device=self._device).reshape(len(obs), -1))
        return float(module.choose(states)[1].float().mean())

    def imitate(self, genomes: torch.Tensor, batch: int, steps: int,
                lr: float) -> tuple[torch.Tensor, list[float], list[float]]:
        """Each genome's actor takes ``steps`` Adam steps on the mean squared distance between
        its actions and pi_rl's on ``batch`` replay states per step. Returns the new genomes
        and each member's loss on its first and on a fresh batch after the last step."""
        module = self.module[DEFAULT_MODULE_ID]
        out, before, after = genomes.clone(), [], []
        if len(self.replay) == 0 or self.critic_updates == 0:  # nothing learned yet to imitate
            return out, before, after
        if not hasattr(self, "imitation_generator"):  # its own draws: DDPG's minibatches stay as they were
            self.imitation_generator = torch.Generator(device=self._device)
            self.imitation_generator.manual_seed(int(self.config.seed or 0) + 31337)
        for row in range(genomes.shape[0]):
            student = load_genome(self._scratch_actor(), genomes[row]).to(self._device)
            optimizer = torch.optim.Adam(student.parameters(), lr=lr)
            for step in range(steps + 1):
                index = torch.randint(0, len(self.replay), (batch,), generator=self.imitation_generator,
                                      device=self._device)
                states = module.obs_norm(self.replay.storage["obs"].index_select(0, index))
                with torch.no_grad():
                    target = module.choose(states)[0]
                loss = (student(states) - target).pow(2).sum(-1).mean()
                if step == 0:
                    before.append(float(loss.detach()))
                if step == steps:
                    after.append(float(loss.detach()))
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            out[row] = genome_of(student)
        return out, before, after


class RIM(ERL):
    """ERL's generation plus recruitment (after the genetic step) and imitation."""

    @classmethod
    def get_default_config(cls) -> RIMConfig:
        return RIMConfig()

    def _learner(self) -> RIMTorchLearner:
        return self.learner_group._learner

    def after_evolution(self, fitness: list[float], report, champion_genome: torch.Tensor) -> None:
        config: RIMConfig = self.config
        tau = config.recruitment_tau if config.recruitment == "soft" else 1.0
        moved = self._learner().recruit(champion_genome, tau)
        self.metrics.log_value((POPULATION, "recruitment_step"), moved, window=1)
        # the EnvRunners act with the pi_ea just recruited (and the critic that chooses)
        self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group, inference_only=True)
        if not config.imitation or (self.generation + 1) % config.imitation_period:
            return
        count = int(config.imitation_fraction * len(fitness))
        by_fitness = sorted(range(len(fitness)), key=lambda slot: fitness[slot])
        candidates = [slot for slot in by_fitness if slot not in report.elites]
        students = candidates[:count]
        if not students:
            return
        learner = self._learner()
        new, before, after = learner.imitate(self.population[students], int(config.imitation_batch),
                                             int(config.imitation_steps), float(config.imitation_lr))
        if before:
            self.population[students] = new
            self.metrics.log_value((POPULATION, "imitation_loss_before"), float(np.mean(before)), window=1)
            self.metrics.log_value((POPULATION, "imitation_loss_after"), float(np.mean(after)), window=1)
            self.metrics.log_value((POPULATION, "imitators"), len(students), window=1)

    def before_learning(self, agent_transitions: dict[str, np.ndarray]) -> None:
        if agent_transitions:
            share = self._learner().pg_share(agent_transitions["obs"])
            self.metrics.log_value((POPULATION, "rl_acted_with_pg"), share, window=1)
