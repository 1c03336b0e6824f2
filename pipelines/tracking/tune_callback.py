"""Tune callback that records each trial as an MLflow run nested under the search's run.

It runs in the Tune driver, so trials never write MLflow themselves. It is pickled with
the experiment state, so a resumed search (``Tuner.restore``) finds the same runs again
by their ``raysmith.trial_id`` tag.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import yaml
from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from pipelines.spec import deep_merge, flatten
from pipelines.tracking.mlflow_run import TAG_PARENT, TAG_TRIAL_ID, RunTracker, make_client

CARRIED_KEY = "raysmith_carried"
"""Result key listing metrics a trial repeated from an earlier report (not logged again)."""

_TUNE_KEYS = set(AUTO_RESULT_KEYS) | {
    "done", "should_checkpoint", "experiment_tag", "trial_id", "experiment_id",
    CARRIED_KEY,
}


def trial_runs(client, experiment_id: str, parent_run_id: str, trial_id: str) -> list:
    """The MLflow runs recorded for one trial of the search run ``parent_run_id``."""
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}' and tags.`{TAG_TRIAL_ID}` = '{trial_id}'",
    )


class MlflowTrialCallback(Callback):
    def __init__(
        self,
        uri: str,
        parent_run_id: str,
        run_name: str,
        base_data: dict[str, Any],
        tags: dict[str, str],
        spec_text: str,
        spec_file: str,
        step_metric: str,
        curve_metrics: Sequence[str],
        log_checkpoints: bool,
    ):
        self.uri = uri
        self.parent_run_id = parent_run_id
        self.run_name = run_name
        self.base_data = base_data
        self.tags = tags
        self.spec_text = spec_text
        self.spec_file = spec_file
        self.step_metric = step_metric
        self.curve_metrics = tuple(curve_metrics)
        self.log_checkpoints = log_checkpoints
        self._trackers: dict[str, RunTracker] = {}
        self._finished: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_trackers"] = {}
        state["_finished"] = set()  # a resumed search may continue a trial ended by Ctrl-C
        return state

    def _tracker(self, trial) -> RunTracker:
        tracker = self._trackers.get(trial.trial_id)
        if tracker is not None:
            return tracker
        client = make_client(self.uri)
        parent = client.get_run(self.parent_run_id)
        found = trial_runs(client, parent.info.experiment_id, self.parent_run_id, trial.trial_id)
        if found:
            tracker = RunTracker.reopen(self.uri, found[0].info.run_id)
        else:
            experiment = client.get_experiment(parent.info.experiment_id).name
            name = f"{self.run_name}-{trial.experiment_tag}"[:250]
            tracker = RunTracker.start(
                self.uri, experiment, name,
                tags={**self.tags, TAG_TRIAL_ID: trial.trial_id},
                parent_run_id=self.parent_run_id,
            )
            resolved = deep_merge(self.base_data, trial.config)
            tracker.log_params(flatten(resolved))
            tracker.log_text(yaml.safe_dump(resolved, sort_keys=False), "spec/resolved.yaml")
            if self.spec_text:
                tracker.log_text(self.spec_text, f"spec/{self.spec_file}")
        self._trackers[trial.trial_id] = tracker
        return tracker

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._tracker(trial)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        carried = set(filter(None, str(result.get(CARRIED_KEY, "")).split(",")))
        metrics = {
            key: value for key, value in result.items()
            if key not in _TUNE_KEYS and key not in carried and key != "config" and not key.startswith("config/")
        }
        # the searched values as metrics too: PBT changes them during a trial. The result's own
        # config is the one that produced it; trial.config may already hold the next exploit's
        # values, since Tune asks the scheduler before the callbacks.
        config = result.get("config")
        for key, value in flatten(config if isinstance(config, dict) else trial.config).items():
            metrics[f"config/{key}"] = value
        step = result.get(self.step_metric, result.get("training_iteration", 0))
        self._tracker(trial).log_metrics(metrics, step=int(step))

    def _end(self, trial, status: str) -> None:
        if trial.trial_id in self._finished:
            return
        self._finished.add(trial.trial_id)
        tracker = self._tracker(trial)
        try:
            tracker.log_learning_curve(self.curve_metrics, xlabel=self.step_metric,
                                       title=tracker.client.get_run(tracker.run_id).info.run_name)
            checkpoint = trial.checkpoint
            if self.log_checkpoints and checkpoint is not None:
                with tempfile.TemporaryDirectory() as tmp:
                    local = checkpoint.to_directory(str(Path(tmp) / "checkpoint"))
                    tracker.log_artifact(local, "checkpoint")
                tracker.set_tags({"raysmith.checkpoint": checkpoint.path})
            error_file = getattr(trial, "error_file", None)
            if status == "FAILED" and error_file and Path(error_file).is_file():
                tracker.log_artifact(error_file, "error")
        except Exception:
            status = "FAILED"  # the record is incomplete: do not call it finished
            raise
        finally:
            tracker.finish(status)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._end(trial, "FAILED")
