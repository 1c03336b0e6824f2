"""The Learner of DDPG, TD3 and RUD: a replay buffer and a tight loop of TD3 updates.

The Algorithm hands over one block of fresh transitions and the number of gradient updates
to run (:meth:`RUDTorchLearner.learn_block`). The loop draws every minibatch index and all
target-smoothing noise for the block up front and then does only tensor work per update:
target, critic step, and every ``policy_delay`` updates an actor step and a Polyak update
of both target networks (one ``_foreach_lerp_``). The target networks change only at that
Polyak update, so on the hand-written path the ``policy_delay`` updates that share them get
their TD targets from one forward pass over their stacked minibatches (the same values as
one pass per update, to float rounding). With the stock networks the updates run
with hand-written gradients (:mod:`agents.rud.fused_update`, ``fused_updates=True``, the
default), otherwise through autograd; both give the same weights to float rounding.
Metrics are summed as tensors and reported once per iteration
(:meth:`RUDTorchLearner.reduce_metrics`)."""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
import torch
from ray.rllib.core import ALL_MODULES, DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.rl_module.apis import TargetNetworkAPI
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME, NUM_ENV_STEPS_TRAINED

from agents.common.learning_rates import apply_learning_rate_schedules
from agents.common.off_policy import ReplayLearnerStateMixin
from agents.common.replay import TransitionBuffer
from agents.rud.fused_update import FusedTD3Update, supports
from agents.rud.rud_rl_module import NEXT_OBS, Q_TARGET, Q_VALUES, SMOOTHING_NOISE

logger = logging.getLogger(__name__)

TD_TARGET = "td_target"
CRITIC_OPTIMIZER = "critic"
ACTOR_OPTIMIZER = "actor"


class RUDTorchLearner(ReplayLearnerStateMixin, TorchLearner):
    GATHER_ROWS = 65_536
    """Transitions gathered from the replay buffer at once (256 updates of batch 256)."""

    def build(self) -> None:
        super().build()
        self.module.foreach_module(
            lambda _, module: module.make_target_networks() if isinstance(module, TargetNetworkAPI) else None
        )
        module = self.module[DEFAULT_MODULE_ID]
        self.replay = TransitionBuffer(self.config.replay_capacity, module.obs_dim, module.act_dim, self._device)
        self.generator = torch.Generator(device=self._device)
        self.generator.manual_seed(int(self.config.seed or 0) + 7919)
        self.critic_updates = 0
        self.actor_updates = 0
        self._totals = torch.zeros(4, device=self._device)
        self._updates_since_reduce = 0
        self._actor_steps_since_reduce = 0
        pairs = module.get_target_network_pairs()
        self._online_params = [p for online, _ in pairs for p in online.parameters()]
        self._target_params = [p for _, target in pairs for p in target.parameters()]
        self._fused: FusedTD3Update | None = None

    def configure_optimizers_for_module(self, module_id: str, config: Any = None) -> None:
        module = self._module[module_id]
        fused = self._device is None or torch.device(self._device).type in ("cpu", "cuda")
        for name, network, lr in (
            (CRITIC_OPTIMIZER, module.critic, config.critic_lr),
            (ACTOR_OPTIMIZER, module.actor, config.actor_lr),
        ):
            params = list(network.parameters())
            self.register_optimizer(
                module_id=module_id,
                optimizer_name=name,
                optimizer=torch.optim.Adam(params, fused=fused),
                params=params,
                lr_or_lr_schedule=lr,
            )

    def compute_loss_for_module(self, *, module_id: str, config: Any, batch: dict[str, Any],
                                fwd_out: dict[str, Any]) -> torch.Tensor:
        """The critics' TD loss: sum over critics of mean (Q_i(s, a) - y)^2."""
        return (fwd_out[Q_VALUES] - batch[TD_TARGET]).pow(2).mean(dim=1).sum()

    def min_replay_size(self) -> int:
        """Transitions the buffer must hold before updates run.

        A fresh run reaches it exactly at ``learning_starts``. A run restored without its
        replay buffer refills this much (acting with the restored policy) before learning
        again, instead of running hundreds of updates on a handful of transitions.
        """
        config = self.config
        return max(config.train_batch_size_per_learner, min(config.learning_starts, config.replay_capacity))

    def learn_block(self, transitions: Mapping[str, np.ndarray], num_updates: int,
                    timesteps: Mapping[str, Any]) -> int:
        """Add one block of transitions to the replay buffer, then run ``num_updates`` updates.

        Returns the number of updates run (0 while the buffer holds fewer than
        :meth:`min_replay_size` transitions). Metrics accumulate until :meth:`reduce_metrics`.
        """
        module = self.module[DEFAULT_MODULE_ID]
        self.replay.add(transitions)
        if transitions and module.normalize_observations:
            module.obs_norm.update(torch.as_tensor(transitions["obs"], device=self._device))
        # before the first update, not after it as RLlib does (see apply_learning_rate_schedules)
        apply_learning_rate_schedules(self, timesteps.get(NUM_ENV_STEPS_SAMPLED_LIFETIME, 0))
        if len(self.replay) < self.min_replay_size():
            num_updates = 0
        if num_updates > 0:
            self._updates(module, num_updates)
            self._weights_seq_no += 1
        self._updates_since_reduce += num_updates
        self.after_gradient_based_update(timesteps=dict(timesteps))
        return num_updates

    def reduce_metrics(self) -> dict[str, Any]:
        """Metrics since the last call, averaged over all updates in between (many blocks
        for TD3's one-step blocks), reduced for the Algorithm."""
        done = self._updates_since_reduce
        log = self.metrics.log_value
        if done:
            critic_loss, q_mean, actor_loss, target_mean = self._totals.tolist()
            log((DEFAULT_MODULE_ID, "critic_loss"), critic_loss / done, reduce="mean", window=1)
            log((DEFAULT_MODULE_ID, "q_mean"), q_mean / done, reduce="mean", window=1)
            log((DEFAULT_MODULE_ID, "target_q_mean"), target_mean / done, reduce="mean", window=1)
            if self._actor_steps_since_reduce:
                log((DEFAULT_MODULE_ID, "actor_loss"), actor_loss / self._actor_steps_since_reduce, reduce="mean", window=1)
        log((DEFAULT_MODULE_ID, "num_updates"), done, reduce="sum")
        log((DEFAULT_MODULE_ID, "replay_size"), len(self.replay), reduce="mean", window=1)
        log((DEFAULT_MODULE_ID, "critic_updates_lifetime"), self.critic_updates, reduce="mean", window=1)
        log((ALL_MODULES, NUM_ENV_STEPS_TRAINED), done * self.config.train_batch_size_per_learner, reduce="sum")
        self._totals.zero_()
        self._updates_since_reduce = self._actor_steps_since_reduce = 0
        return self.metrics.reduce()

    def _updates(self, module, num_updates: int) -> None:
        """``num_updates`` TD3 updates; every minibatch index and all target-smoothing noise
        are drawn first, in this order, whichever path then runs them."""
        config = self.config
        batch_size = config.train_batch_size_per_learner
        device = self._device
        indices = torch.randint(0, len(self.replay), (num_updates, batch_size), generator=self.generator, device=device)
        noise = None
        if config.target_noise > 0:
            noise = torch.randn(num_updates, batch_size, module.act_dim, generator=self.generator, device=device)
            noise.mul_(config.target_noise).clamp_(-config.target_noise_clip, config.target_noise_clip)
        if not module.training:
            module.train()
        if self._fused is None or self._fused.module is not module:
            self._fused = self._build_fused(module)
        if self._fused is not None:
            self._fused_updates(module, indices, noise)
        else:
            self._autograd_updates(module, indices, noise)

    def _build_fused(self, module) -> FusedTD3Update | None:
        precision = self.config.hidden_matmul_precision
        if not (self.config.fused_updates and supports(module)):
            if precision != "float32":
                logger.warning("hidden_matmul_precision=%r applies to the hand-written update of the stock "
                               "networks; this module learns through autograd in float32", precision)
            return None
        if precision == "bfloat16" and not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                                            and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            logger.warning("hidden_matmul_precision='bfloat16': oneDNN is off or has no bfloat16 path on this CPU "
                           "(torch.backends.mkldnn.enabled, torch.ops.mkldnn._is_mkldnn_bf16_supported()), "
                           "so the products stay float32")
        return FusedTD3Update(
            module, self.get_optimizer(DEFAULT_MODULE_ID, CRITIC_OPTIMIZER),
            self.get_optimizer(DEFAULT_MODULE_ID, ACTOR_OPTIMIZER), tau=self.config.tau, totals=self._totals,
            hidden_precision=self.config.hidden_matmul_precision,
        )

    def _fused_updates(self, module, indices: torch.Tensor, noise: torch.Tensor | None) -> None:
        """The updates by :class:`FusedTD3Update`; minibatches are gathered a chunk of
        updates at a time (one ``index_select`` per field per chunk)."""
        fused, delay = self._fused, self.config.policy_delay
        num_updates, batch_size = indices.shape
        fused.prepare()
        chunk = max(1, min(num_updates, self.GATHER_ROWS // batch_size))
        for first in range(0, num_updates, chunk):
            rows = indices[first : first + chunk]
            batch = self.replay.gather(rows.reshape(-1))
            count = rows.shape[0]
            obs = module.obs_norm(batch["obs"]).view(count, batch_size, -1)
            next_obs = module.obs_norm(batch["next_obs"]).view(count, batch_size, -1)
            actions = batch["actions"].view(count, batch_size, -1)
            rewards = batch["rewards"].view(count, batch_size, 1)
            discounts = (1.0 - batch["terminateds"]).mul_(self.config.gamma).view(count, batch_size, 1)
            k = 0
            while k < count:
                # the target networks change only at an actor step, so the targets of the
                # updates up to and including the next one come from the same networks:
                # one forward pass over their stacked minibatches
                group = min(count - k, delay - self.critic_updates % delay)
                rows_k = slice(k, k + group)
                smoothing = None if noise is None else noise[first + k : first + k + group].reshape(-1, noise.shape[-1])
                td_targets = fused.target(next_obs[rows_k].reshape(group * batch_size, -1),
                                          rewards[rows_k].reshape(-1, 1), discounts[rows_k].reshape(-1, 1),
                                          smoothing, group).view(group, batch_size, 1)
                for j in range(k, k + group):
                    fused.critic_step(obs[j], actions[j], td_targets[j - k])
                    self.critic_updates += 1
                    if self.critic_updates % delay == 0:
                        fused.actor_step(obs[j])
                        self._actor_steps_since_reduce += 1
                        self.actor_updates += 1
                k += group

    def _autograd_updates(self, module, indices: torch.Tensor, noise: torch.Tensor | None) -> None:
        """The same updates through autograd and ``Optimizer.step``: for modules with other
        networks, and the reference the fused path is tested against."""
        config = self.config
        critic_optimizer = self.get_optimizer(DEFAULT_MODULE_ID, CRITIC_OPTIMIZER)
        actor_optimizer = self.get_optimizer(DEFAULT_MODULE_ID, ACTOR_OPTIMIZER)
        module_config = self.config.get_config_for_module(DEFAULT_MODULE_ID)
        gamma, tau, delay = config.gamma, config.tau, config.policy_delay
        totals = self._totals  # critic loss, Q mean, actor loss, target Q mean
        for update in range(indices.shape[0]):
            batch = self.replay.gather(indices[update])
            with torch.no_grad():
                target_inputs = {NEXT_OBS: batch["next_obs"]}
                if noise is not None:
                    target_inputs[SMOOTHING_NOISE] = noise[update]
                next_q = module.forward_target(target_inputs)[Q_TARGET]
                td_target = batch["rewards"] + gamma * (1.0 - batch["terminateds"]) * next_q
            fwd_out = module._forward_train({Columns.OBS: batch["obs"], Columns.ACTIONS: batch["actions"]})
            critic_loss = self.compute_loss_for_module(
                module_id=DEFAULT_MODULE_ID, config=module_config, batch={TD_TARGET: td_target}, fwd_out=fwd_out
            )
            critic_optimizer.zero_grad(set_to_none=True)
            critic_loss.backward()
            critic_optimizer.step()
            self.critic_updates += 1
            with torch.no_grad():
                totals[0] += critic_loss
                totals[1] += fwd_out[Q_VALUES].mean()
                totals[3] += next_q.mean()
            if self.critic_updates % delay == 0:
                actor_loss = -module.policy_value(batch["obs"]).mean()
                actor_optimizer.zero_grad(set_to_none=True)
                actor_loss.backward()
                actor_optimizer.step()
                with torch.no_grad():  # outside autograd: targets must not join the graph
                    torch._foreach_lerp_(self._target_params, self._online_params, tau)
                    totals[2] += actor_loss
                self._actor_steps_since_reduce += 1
                self.actor_updates += 1

    def _counters(self) -> dict[str, int]:
        return {"critic": self.critic_updates, "actor": self.actor_updates}

    def _set_counters(self, counters: dict[str, int]) -> None:
        self.critic_updates = int(counters["critic"])
        self.actor_updates = int(counters["actor"])
