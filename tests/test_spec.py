"""Spec validation: every bad input is refused before Ray starts, with a precise message."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import CONFIGS, tiny_ppo, write_spec

from pipelines.errors import SpecError
from pipelines.spec import deep_merge, flatten, load_spec, nest


def problems(tmp_path: Path, text: str, overrides=()) -> list[str]:
    path = write_spec(tmp_path, "spec.yaml", text)
    with pytest.raises(SpecError) as caught:
        load_spec(path, overrides)
    assert caught.value.source == str(path)
    return [p.render() for p in caught.value.problems]


def experiment_specs() -> list[Path]:
    return sorted(p for p in CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("path", experiment_specs(), ids=lambda p: p.name)
def test_every_shipped_spec_is_valid(path, tmp_path):
    overrides = []
    if path.name.startswith("forgery_eval"):  # it names the checkpoint a training run writes
        (tmp_path / "state.pt").write_bytes(b"")
        overrides = [f"checkpoint={tmp_path / 'state.pt'}"]
    loaded = load_spec(path, overrides)
    kinds = {"cswin_": "classify", "forgery_eval": "forgery-eval", "forgery_": "forgery-train",
             "watermark_peers": "watermark-eval", "watermark_": "watermark-train", "peco_": "peco"}
    expected = next((kind for prefix, kind in kinds.items() if path.name.startswith(prefix)), "rl")
    assert loaded.spec.kind == expected
    assert loaded.spec_hash() == load_spec(path, overrides).spec_hash()


def test_tiny_spec_loads_with_defaults(tmp_path):
    loaded = load_spec(write_spec(tmp_path, "tiny.yaml", tiny_ppo()))
    spec = loaded.spec
    assert spec.algorithm == "PPO" and spec.env == "CartPole-v1"
    assert spec.evaluation.explore is False and spec.evaluation.at_start is True
    assert spec.stop.env_steps == 1500


def test_unknown_key_names_path_line_and_allowed_keys(tmp_path):
    text = tiny_ppo().replace("evaluation:\n", "evaluation:\n  episodez: 3\n")
    [message] = problems(tmp_path, text)
    assert "evaluation.episodez" in message
    assert "unknown key 'episodez'" in message
    assert "did you mean 'episodes'" in message
    assert "allowed keys here: at_start, enabled, episodes, every_env_steps, explore, num_env_runners" in message
    line = text.splitlines().index("  episodez: 3") + 1
    assert message.startswith(f"line {line}:")


def test_unknown_top_level_key(tmp_path):
    [message] = problems(tmp_path, tiny_ppo() + "trainig: {}\n")
    assert "trainig: unknown key 'trainig'" in message and "'training'" in message


def test_wrong_type_names_value_and_expectation(tmp_path):
    [message] = problems(tmp_path, tiny_ppo().replace("env_steps: 1500", "env_steps: lots"))
    assert "stop.env_steps" in message
    assert "'lots' (str)" in message
    assert "valid integer" in message


def test_set_override_is_type_checked_and_marked(tmp_path):
    [message] = problems(tmp_path, tiny_ppo(), ["stop.env_steps=-5"])
    assert "stop.env_steps" in message and "greater than or equal to 1" in message
    assert "(from --set)" in message


def test_set_override_changes_the_spec(tmp_path):
    path = write_spec(tmp_path, "spec.yaml", tiny_ppo())
    loaded = load_spec(path, ["stop.env_steps=777", "training.lr=1e-4", "evaluation.enabled=false"])
    assert loaded.spec.stop.env_steps == 777
    assert loaded.spec.training["lr"] == pytest.approx(1e-4)
    assert loaded.spec.evaluation.enabled is False
    assert loaded.spec_hash() != load_spec(path).spec_hash()


def test_set_override_needs_path_and_value(tmp_path):
    path = write_spec(tmp_path, "spec.yaml", tiny_ppo())
    with pytest.raises(SpecError, match="expected PATH=VALUE"):
        load_spec(path, ["stop.env_steps"])
    with pytest.raises(SpecError, match="holds 'PPO', not a section"):
        load_spec(path, ["algorithm.name=x"])


def test_unknown_kind_lists_kinds(tmp_path):
    [message] = problems(tmp_path, tiny_ppo().replace("kind: rl", "kind: rll"))
    assert "unknown pipeline kind 'rll'" in message
    assert "did you mean 'rl'" in message and "allowed kinds: classify, forgery-eval, forgery-train, peco, peco-mim, peco-moco, peco-tokenizer, rl, watermark-eval, watermark-train" in message


def test_missing_kind(tmp_path):
    [message] = problems(tmp_path, tiny_ppo().replace("kind: rl\n", ""))
    assert message.startswith("kind: required") and "allowed kinds" in message


def test_unknown_env_lists_close_matches(tmp_path):
    [message] = problems(tmp_path, tiny_ppo().replace("CartPole-v1", "CartPol-v1"))
    assert "env: unknown gymnasium environment 'CartPol-v1'" in message
    assert "'CartPole-v1'" in message


def test_unknown_algorithm_lists_close_matches(tmp_path):
    [message] = problems(tmp_path, tiny_ppo().replace("algorithm: PPO", "algorithm: PP0"))
    assert "unknown algorithm 'PP0'" in message and "'PPO'" in message


def test_unknown_rllib_argument_lists_allowed(tmp_path):
    [message] = problems(tmp_path, tiny_ppo().replace("  lr: 0.001", "  learning_rate: 0.001"))
    assert "training.learning_rate" in message
    assert "unknown PPOConfig.training() argument 'learning_rate'" in message
    assert "allowed:" in message and " lr," in message


def test_rllib_validation_error_comes_before_ray(tmp_path):
    [message] = problems(tmp_path, tiny_ppo().replace("minibatch_size: 100", "minibatch_size: 5000"))
    assert "training: PPO refused this configuration" in message and "minibatch_size" in message


def test_learning_rate_must_be_positive(tmp_path):
    [message] = problems(tmp_path, tiny_ppo(), ["training.lr=-0.001"])
    assert message.startswith("training.lr: must be positive") and "(from --set)" in message


def test_bad_env_config_is_refused(tmp_path):
    text = tiny_ppo() + "env_config:\n  no_such_argument: 1\n"
    [message] = problems(tmp_path, text)
    assert message.startswith("line") and "env_config:" in message and "no_such_argument" in message


def test_discrete_algorithm_on_continuous_env(tmp_path):
    text = tiny_ppo().replace("algorithm: PPO", "algorithm: DQN").replace("CartPole-v1", "Pendulum-v1")
    text = text.replace("  minibatch_size: 100\n  num_epochs: 4\n", "")
    [message] = problems(tmp_path, text)
    assert "DQN needs a discrete action space" in message and "Pendulum-v1" in message


RUD_SPEC = """\
kind: rl
algorithm: RUD
env: {env}
stop: {{env_steps: 1000}}
"""


def test_rud_refuses_discrete_actions(tmp_path):
    [message] = problems(tmp_path, RUD_SPEC.format(env="CartPole-v1"))
    assert message.startswith("line 3: env: RUD cannot run on CartPole-v1")
    assert "need continuous actions (a 1-D Box)" in message and "Discrete(2)" in message


def test_rud_training_arguments_are_checked(tmp_path):
    text = RUD_SPEC.format(env="HalfCheetah-v5") + "training:\n  update_intervall: 500\n"
    [message] = problems(tmp_path, text)
    assert "training.update_intervall" in message and "did you mean 'update_interval'" in message
    [message] = problems(tmp_path, RUD_SPEC.format(env="HalfCheetah-v5"), ["training.policy_delay=0"])
    assert "policy_delay must be >= 1" in message
    [message] = problems(tmp_path, RUD_SPEC.format(env="HalfCheetah-v5"), ["learners.num_learners=2"])
    assert "num_learners must be 0" in message
    # RLlib settings RUD would take and not apply are refused, naming what to set instead
    [message] = problems(tmp_path, RUD_SPEC.format(env="HalfCheetah-v5"), ["training.lr=0.001"])
    assert "lr is not a RUD setting" in message and "set actor_lr and critic_lr" in message


def test_rud_network_settings_are_checked(tmp_path):
    [message] = problems(tmp_path, RUD_SPEC.format(env="HalfCheetah-v5") + "model: {activation: gelu}\n")
    assert "model.activation: activation must be one of relu, tanh, elu; got 'gelu'" in message
    found = problems(tmp_path, RUD_SPEC.format(env="HalfCheetah-v5") + "model: {critic_hidden: [], actor_hidden: [0]}\n")
    assert len(found) == 2
    assert "model.actor_hidden: actor_hidden must be a list of positive layer widths" in found[0]
    assert "model.critic_hidden: critic_hidden must be a list of positive layer widths, at least one" in found[1]


def test_unknown_mujoco_env_lists_close_matches(tmp_path):
    [message] = problems(tmp_path, RUD_SPEC.format(env="HalfCheeta-v5"))
    assert "unknown gymnasium environment 'HalfCheeta-v5'" in message and "'HalfCheetah-v5'" in message


def test_stop_needs_a_budget(tmp_path):
    [message] = problems(tmp_path, tiny_ppo().replace("  env_steps: 1500", "  target_return: 100"))
    assert message.startswith("line") and "stop: give a budget" in message


def test_yaml_syntax_error_has_line(tmp_path):
    [message] = problems(tmp_path, tiny_ppo() + "model: [unclosed\n")
    assert "not valid YAML" in message and message.startswith("line")


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "nope.yaml")


SEARCH = """\
search:
  metric: evaluation/return_mean
  num_samples: 2
  searcher: {searcher}
  scheduler: {scheduler}
  space:
{space}
"""


def with_search(searcher="random", scheduler="fifo", space="    training.lr: {loguniform: [0.0001, 0.01]}"):
    return tiny_ppo() + SEARCH.format(searcher=searcher, scheduler=scheduler, space=space)


def test_search_section_loads(tmp_path):
    loaded = load_spec(write_spec(tmp_path, "s.yaml", with_search(scheduler="{type: asha, grace_period: 2}")))
    search = loaded.spec.search
    assert search.scheduler.type == "asha" and search.scheduler.grace_period == 2
    assert search.space["training.lr"].name == "loguniform"


def test_search_space_path_must_exist(tmp_path):
    [message] = problems(tmp_path, with_search(space="    stop.env_stepz: {choice: [1000, 2000]}"))
    assert message.startswith("line") and "search.space.stop.env_stepz" in message
    assert "unknown key 'env_stepz'" in message


def test_search_space_values_must_fit_the_field(tmp_path):
    [message] = problems(tmp_path, with_search(space="    stop.env_steps: {choice: [1000, many]}"))
    assert "search.space.stop.env_steps" in message and "'many'" in message


def test_search_space_values_checked_by_rllib(tmp_path):
    [message] = problems(tmp_path, with_search(space="    training.minibatch_size: {choice: [100, 5000]}"))
    assert "search.space.training.minibatch_size" in message and "5000" in message


def test_distribution_needs_exactly_one_form(tmp_path):
    [message] = problems(tmp_path, with_search(space="    training.lr: {uniform: [0.1, 0.2], choice: [1]}"))
    assert "give exactly one of" in message


def test_distribution_bounds(tmp_path):
    [message] = problems(tmp_path, with_search(space="    training.lr: {loguniform: [0, 0.1]}"))
    assert "bounds must be positive" in message


def test_optuna_refuses_grid(tmp_path):
    [message] = problems(tmp_path, with_search(searcher="optuna", space="    training.lr: {grid: [0.001, 0.01]}"))
    assert "optuna" in message and "grid" in message


def test_pbt_needs_a_space(tmp_path):
    [message] = problems(tmp_path, tiny_ppo() + "search:\n  scheduler: pbt\n")
    assert "pbt" in message and "non-empty space" in message


def test_unknown_scheduler_type(tmp_path):
    [message] = problems(tmp_path, with_search(scheduler="hyperband"))
    assert "search.scheduler" in message and "'fifo', 'asha', 'pbt'" in message


def test_dict_helpers():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": 1, "a.c": "[1, 2]", "d": "x"}
    assert nest({"a.b": 1, "a.c": 2, "d": 3}) == {"a": {"b": 1, "c": 2}, "d": 3}
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}


def test_duplicate_keys_are_refused(tmp_path):
    [message] = problems(tmp_path, tiny_ppo() + "seed: 3\n")
    assert "key 'seed' appears twice (first on line 3)" in message and message.startswith("line")


def test_continuous_dimension_on_an_integer_field(tmp_path):
    [message] = problems(tmp_path, with_search(space="    stop.env_steps: {uniform: [1000, 5000]}"))
    assert "search.space.stop.env_steps" in message and "fractional part" in message


@pytest.mark.parametrize("searcher", ["grid", "optuna"])
def test_pbt_needs_the_random_searcher(tmp_path, searcher):
    [message] = problems(tmp_path, with_search(searcher=searcher, scheduler="pbt",
                                               space="    training.lr: {choice: [0.001, 0.01]}"))
    assert "pbt" in message and "use searcher 'random'" in message


def test_pb2_needs_numeric_ranges(tmp_path):
    [message] = problems(tmp_path, with_search(scheduler="pb2", space="    training.lr: {choice: [0.001, 0.01]}"))
    assert "pb2" in message and "numeric ranges" in message and "training.lr" in message


def test_search_metric_must_be_reported(tmp_path):
    text = with_search().replace("metric: evaluation/return_mean", "metric: evaluation/retrun_mean")
    [message] = problems(tmp_path, text)
    assert message.startswith("line") and "search.metric: 'evaluation/retrun_mean' is not reported" in message
    assert "did you mean 'evaluation/return_mean'" in message
    # without evaluation there is no evaluation metric to optimise
    [message] = problems(tmp_path, with_search(), ["evaluation.enabled=false"])
    assert "search.metric: 'evaluation/return_mean' is not reported" in message
    load_spec(write_spec(tmp_path, "ok.yaml", with_search().replace("evaluation/return_mean", "learner/total_loss")))


def test_scheduler_time_attr_must_be_reported(tmp_path):
    [message] = problems(tmp_path, with_search(scheduler="{type: asha, time_attr: env_step}"))
    assert "search.scheduler.time_attr: 'env_step' is not reported" in message and "'env_steps'" in message
    load_spec(write_spec(tmp_path, "ok.yaml", with_search(scheduler="{type: asha, time_attr: env_steps}")))


def test_model_settings_are_checked(tmp_path):
    [message] = problems(tmp_path, tiny_ppo().replace("fcnet_hiddens", "fcnet_hidens"))
    assert "model.fcnet_hidens: unknown PPO model setting" in message and "'fcnet_hiddens'" in message
    [message] = problems(tmp_path, RUD_SPEC.format(env="HalfCheetah-v5") + "model: {actor_hiden: [64]}\n")
    assert "model.actor_hiden" in message and "'actor_hidden'" in message
    # the module's training settings belong in training:, where the spec's other checks see them
    [message] = problems(tmp_path, RUD_SPEC.format(env="HalfCheetah-v5") + "model: {learning_starts: 10}\n")
    assert "model.learning_starts" in message and "allowed: activation, actor_hidden, critic_hidden" in message
