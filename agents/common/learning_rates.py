"""Learning rates after a restore: what the config says, from the first update on."""

from __future__ import annotations

from typing import Any


def apply_learning_rate_schedules(learner: Any, timestep: int) -> None:
    """Set each of an RLlib Learner's optimizers to its configured rate at ``timestep``.

    Restoring a checkpoint restores the optimizers' states, learning rates included, and
    RLlib re-applies the configured rates only after the next update. When the config's
    rates differ from the checkpoint's (PBT's explore step), that first update would use
    the old ones; calling this right after a restore, or before updates, prevents it.
    """
    for optimizer, schedule in learner._optimizer_lr_schedules.items():
        learner._set_optimizer_lr(optimizer, lr=schedule.update(timestep=timestep))
