"""What a pipeline kind is: a spec model, checks that run before Ray, and a ``run`` method.

``run`` does the work and reports through a :class:`pipelines.session.Session`; the same
``run`` serves a local run (the session writes MLflow directly), a Tune trial (the session
reports to Tune and the driver writes MLflow) and a Ray Job (a local run on the cluster).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from pipelines.errors import Problem
from pipelines.spec import ExperimentSpec

if TYPE_CHECKING:
    from pipelines.session import Session


class Pipeline(ABC):
    kind: ClassVar[str]
    spec_model: ClassVar[type[ExperimentSpec]]
    summary: ClassVar[str] = ""
    """One line for ``raysmith kinds``."""
    step_metric: ClassVar[str] = "iteration"
    """The metric used as MLflow's step (for RL: env steps)."""
    time_attr: ClassVar[str] = "iteration"
    """The reported metric that counts a trial's progress for Tune's schedulers."""
    key_metrics: ClassVar[tuple[str, ...]] = ()
    """Columns of ``raysmith runs`` and of the search table."""
    curve_metrics: ClassVar[tuple[str, ...]] = ()
    """Metrics drawn against the step in the learning-curve PNG."""
    reuse_trial_processes: ClassVar[bool] = False
    """Whether a Tune search hands a trial's process to the next trial or PBT exploit
    (``TuneConfig.reuse_actors``). Only for kinds whose ``run`` has released everything it
    started by the time it returns or is stopped at a report; a kind that leaves work behind
    (a Ray Train run finishing in the background) gets a fresh process per trial."""

    def check(self, spec: ExperimentSpec) -> list[Problem]:
        """Problems Pydantic cannot see (unknown env ids, arguments a library refuses).

        Runs before Ray starts; must not need Ray.
        """
        return []

    def reported_metrics(self, spec: ExperimentSpec) -> tuple[set[str], tuple[str, ...]]:
        """(metric names, name prefixes) a run of ``spec`` reports; a search's ``metric`` and
        its scheduler's ``time_attr`` must be among them."""
        return {self.step_metric, self.time_attr, *self.key_metrics}, ()

    def trial_resources(self, spec: ExperimentSpec) -> list[dict[str, float]]:
        """Placement-group bundles one trial needs; the first is the trial's own process."""
        return [{"CPU": 1.0}]

    def checkpoints_to_keep(self, spec: ExperimentSpec) -> int:
        """Checkpoints a local run keeps on disk (older ones are deleted)."""
        return 2

    def progress_total(self, spec: ExperimentSpec) -> int | None:
        """The step count at which the run ends, when known (drives the progress bar)."""
        return None

    @abstractmethod
    def run(self, spec: ExperimentSpec, session: "Session") -> dict[str, Any]:
        """Do the work, report through ``session``; return a summary of the final state."""
