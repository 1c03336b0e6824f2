"""The Learner of NROWAN-DQN, NoisyNet-DQN and DQN: a replay buffer and a tight update loop.

One update, top to bottom (Han et al., arXiv 2006.10980):

    y       = r + gamma * (1 - terminated) * max_b Q_target(s', b)        (fresh noise)
    TD      = mean (Q(s, a) - y)^2                                         (fresh noise)
    D       = (sum |sigma_w| + sum |sigma_b|) / ((p* + 1) * N_a)           output layer only
    k_i     = clip(k_final * (R+_i - R_min) / (R_max - R_min), 0, k_final) per transition
    loss    = TD + mean_i(k_i) * D

R+ is the reward accumulated in the transition's episode up to and including its own
reward; the EnvRunner records it with each transition. ``k_final = 0`` is NoisyNet-DQN.
The target network is a hard copy every ``target_update_interval`` updates.

Speed: the Q-network's parameters live in one flat buffer (one fused Adam kernel per
update) and, for the MLP Q-network, the gradient is computed by hand
(:mod:`agents.nrowan.td_gradients`) instead of by autograd, whose per-operation cost is
most of an update at batch 32. :meth:`NROWANTorchLearner.compute_loss_for_module` is the
same loss for autograd (used for any other network), and the tests hold the two equal.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from ray.rllib.core import ALL_MODULES, DEFAULT_MODULE_ID
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.rl_module.apis import TargetNetworkAPI
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME, NUM_ENV_STEPS_TRAINED

from agents.common.flat_parameters import FlatAdam, flatten_parameters
from agents.common.learning_rates import apply_learning_rate_schedules
from agents.common.off_policy import ReplayLearnerStateMixin
from agents.common.replay import TransitionBuffer
from agents.common.transition_env_runner import RETURN_SO_FAR
from agents.nrowan.nrowan_rl_module import Q_VALUES, QNetwork
from agents.nrowan.td_gradients import TDGradients, noise_level  # noqa: F401  (noise_level: part of this module's API)

TD_TARGET = "td_target"


def noise_weight(return_so_far: torch.Tensor, k_final: float, r_min: float, r_max: float) -> torch.Tensor:
    """Online weight adjustment: k = clip(k_final * (R+ - R_min) / (R_max - R_min), 0, k_final)."""
    return (k_final * (return_so_far - r_min) / (r_max - r_min)).clamp(0.0, k_final)


class NROWANTorchLearner(ReplayLearnerStateMixin, TorchLearner):
    def build(self) -> None:
        super().build()
        self.module.foreach_module(
            lambda _, module: module.make_target_networks() if isinstance(module, TargetNetworkAPI) else None
        )
        module = self.module[DEFAULT_MODULE_ID]
        self.replay = TransitionBuffer(self.config.replay_capacity, module.obs_shape, 1, self._device,
                                       extra_fields=(RETURN_SO_FAR,), obs_dtype=module.obs_dtype)
        self.return_bounds = self.config.return_bounds() or (0.0, 1.0)  # unused when k_final = 0
        self.generator = torch.Generator(device=self._device)
        self.generator.manual_seed(int(self.config.seed or 0) + 7919)
        # the MLP Q-network's gradient by hand; other networks go through autograd
        self.td_gradients = TDGradients(module.q) if type(module.q) is QNetwork else None
        self.num_updates = 0
        self._terms: tuple[list, list, list, list] = ([], [], [], [])  # per update: td loss, D, mean k, Q mean
        self._updates_since_reduce = 0

    def configure_optimizers_for_module(self, module_id: str, config: Any = None) -> None:
        module = self._module[module_id]
        self.flat_parameters = flatten_parameters(module.q.parameters())
        self.register_optimizer(module_id=module_id, optimizer_name="q", optimizer=FlatAdam(self.flat_parameters),
                                params=[self.flat_parameters], lr_or_lr_schedule=config.lr)

    def compute_loss_for_module(self, *, module_id: str, config: Any, batch: dict[str, Any],
                                fwd_out: dict[str, Any]) -> torch.Tensor:
        """TD loss + mean(k) * D for a minibatch with its targets (``batch[TD_TARGET]``).

        The terms are kept in ``self.last_terms`` (TD loss, D, mean k, mean Q(s, a)) for metrics.
        """
        module = self.module[module_id]
        q_taken = fwd_out[Q_VALUES].gather(-1, batch["actions"].long().reshape(-1, 1)).squeeze(-1)
        td_loss = (q_taken - batch[TD_TARGET]).pow(2).mean()
        level = noise_level(module.q.output_layer) if module.noisy else None
        k = None
        loss = td_loss
        if module.noisy and config.k_final > 0:
            k = noise_weight(batch[RETURN_SO_FAR], config.k_final, *self.return_bounds).mean()
            loss = td_loss + k * level
        self.last_terms = (td_loss, level, k, q_taken)
        return loss

    def learn_block(self, transitions: Mapping[str, np.ndarray], num_updates: int,
                    timesteps: Mapping[str, Any]) -> int:
        """Add fresh transitions to the replay buffer, then run ``num_updates`` updates.

        Returns the number of updates run: none while the buffer holds fewer than
        ``learning_starts`` transitions (or one minibatch, whichever is more).
        """
        self.replay.add(transitions)
        if len(self.replay) < max(self.config.learning_starts, self.config.train_batch_size_per_learner):
            num_updates = 0
        if num_updates > 0:
            apply_learning_rate_schedules(self, timesteps.get(NUM_ENV_STEPS_SAMPLED_LIFETIME, 0))
            self._updates(self.module[DEFAULT_MODULE_ID], num_updates)
            self._weights_seq_no += 1
        self._updates_since_reduce += num_updates
        return num_updates

    def _updates(self, module, num_updates: int) -> None:
        config = self.config
        batch_size = config.train_batch_size_per_learner
        indices = torch.randint(0, len(self.replay), (num_updates, batch_size), generator=self.generator,
                                device=self._device)
        optimizer = self.get_optimizer(DEFAULT_MODULE_ID, "q")
        module_config = config.get_config_for_module(DEFAULT_MODULE_ID)
        q, target_q, noisy = module.q, module.target_q, module.noisy
        gamma, interval = config.gamma, int(config.target_update_interval)
        weighted = noisy and config.k_final > 0
        by_hand = self.td_gradients
        td_losses, levels, weights, q_means = self._terms
        for update in range(num_updates):
            batch = self.replay.gather(indices[update])
            with torch.no_grad():
                next_q = target_q.forward(batch["next_obs"], noisy=noisy).max(-1).values
                target = torch.addcmul(batch["rewards"], 1.0 - batch["terminateds"], next_q, value=gamma)
            if by_hand:
                k = noise_weight(batch[RETURN_SO_FAR], config.k_final, *self.return_bounds).mean() if weighted else None
                td_loss, q_taken, level = by_hand(batch["obs"], batch["actions"].long(), target,
                                                  q.sample_noise() if noisy else None, k)
            else:
                batch[TD_TARGET] = target
                fwd_out = {Q_VALUES: q(batch["obs"], noisy=noisy)}
                loss = self.compute_loss_for_module(module_id=DEFAULT_MODULE_ID, config=module_config, batch=batch,
                                                    fwd_out=fwd_out)
                self.flat_parameters.grad.zero_()  # the views' gradients accumulate into it
                loss.backward()
                td_loss, level, k, q_taken = (None if term is None else term.detach() for term in self.last_terms)
            optimizer.step_flat()
            self.num_updates += 1
            if self.num_updates % interval == 0:
                with torch.no_grad():
                    torch._foreach_copy_(list(target_q.parameters()), list(q.parameters()))
            td_losses.append(td_loss)
            q_means.append(q_taken.mean())
            if level is not None:
                levels.append(level)
            if k is not None:
                weights.append(k)

    def reduce_metrics(self) -> dict[str, Any]:
        """Means over the updates since the last call (TD loss, D, k, Q) and each noisy layer's
        mean |sigma| at the end of them."""
        done = self._updates_since_reduce
        log = self.metrics.log_value
        module = self.module[DEFAULT_MODULE_ID]
        if done:
            td_losses, levels, weights, q_means = (torch.stack(terms).mean().item() if terms else 0.0
                                                   for terms in self._terms)
            log((DEFAULT_MODULE_ID, "td_loss"), td_losses, reduce="mean", window=1)
            log((DEFAULT_MODULE_ID, "q_mean"), q_means, reduce="mean", window=1)
            if module.noisy:
                log((DEFAULT_MODULE_ID, "noise_D"), levels, reduce="mean", window=1)
                log((DEFAULT_MODULE_ID, "noise_k"), weights, reduce="mean", window=1)
        with torch.no_grad():  # now, after the iteration's updates
            sigmas = [(position, layer.mean_abs_sigma().item()) for position, layer in module.q.noisy_layers]
        for position, sigma in sigmas:
            log((DEFAULT_MODULE_ID, f"sigma_mean_layer{position}"), sigma, reduce="mean", window=1)
        log((DEFAULT_MODULE_ID, "num_updates"), done, reduce="sum")
        log((DEFAULT_MODULE_ID, "replay_size"), len(self.replay), reduce="mean", window=1)
        log((ALL_MODULES, NUM_ENV_STEPS_TRAINED), done * self.config.train_batch_size_per_learner, reduce="sum")
        for terms in self._terms:
            terms.clear()
        self._updates_since_reduce = 0
        return self.metrics.reduce()

    def _counters(self) -> dict[str, int]:
        return {"updates": self.num_updates}

    def _set_counters(self, counters: dict[str, int]) -> None:
        self.num_updates = int(counters["updates"])
