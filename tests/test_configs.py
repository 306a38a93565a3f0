"""Every shipped config validates; config mistakes are clear errors, all reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from sft.config import RunConfig, load_config, validate_config
from sft.errors import SftError
from sft.train import build_sft_config

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not {"accelerate", "sweeps"} & set(p.parts))


def minimal(**sections) -> dict:
    raw = {"model": {"name_or_path": "models/x"}, "data": {"train": "data/reverse/train.jsonl"}}
    raw.update(sections)
    return raw


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_validates_and_builds_sft_config(path, tmp_path):
    config = load_config(path)
    assert isinstance(config, RunConfig)
    sft = build_sft_config(config.train, tmp_path, config.data.max_length)
    assert sft.max_length == config.data.max_length
    for key, value in config.train.items():  # nothing the config sets is dropped or changed
        built = getattr(sft, key)
        assert getattr(built, "value", built) == value, key


def test_there_are_real_model_configs():
    names = {p.parent.name for p in RUN_CONFIGS}
    assert {"qwen2_5_0_5b", "llama3_1_8b", "mistral_7b"} <= names


def test_misspelt_keys_get_suggestions_and_all_problems_come_at_once():
    raw = minimal(adapter={"rank": 8}, train={"learing_rate": 1e-4}, eval={"max_new_tokns": 3})
    raw["data"]["max_lenght"] = 5
    with pytest.raises(SftError) as err:
        validate_config(raw)
    text = str(err.value)
    assert "4 problem(s)" in text
    assert "adapter.rank: unknown key" in text
    assert "train.learing_rate" in text and "'learning_rate'" in text
    assert "eval.max_new_tokns" in text and "'max_new_tokens'" in text
    assert "data.max_lenght" in text and "'max_length'" in text


def test_train_section_is_validated_by_building_sft_config():
    with pytest.raises(SftError, match="lr_scheduler_type|SchedulerType"):
        validate_config(minimal(train={"lr_scheduler_type": "bogus"}))
    with pytest.raises(SftError, match="train.max_length: not settable here: set data.max_length"):
        validate_config(minimal(train={"max_length": 10}))
    config = validate_config(minimal(train={"weight_decay": 0.1, "optim": "adamw_torch"}))
    assert config.train == {"weight_decay": 0.1, "optim": "adamw_torch"}


def test_wrong_types_and_missing_sections_name_the_key():
    with pytest.raises(SftError) as err:
        validate_config({"model": {"name_or_path": "m", "dtype": "float8"}, "adapter": {"r": "big"}})
    text = str(err.value)
    assert "data: required key is missing" in text
    assert "model.dtype" in text and "adapter.r" in text


def test_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name_or_path: m\ndata:\n  train: a.jsonl\n")
    config = load_config(path, ["train.learning_rate=1e-4", "adapter.r=8", "data.train=[b.jsonl, c.jsonl]"])
    assert config.train["learning_rate"] == 1e-4
    assert config.adapter.r == 8
    assert [s.path for s in config.data.train] == ["b.jsonl", "c.jsonl"]
    assert config.output.name == "run"
    with pytest.raises(SftError, match="expected KEY.PATH=VALUE"):
        load_config(path, ["train.learning_rate"])
    with pytest.raises(SftError, match="model.name_or_path is 'm', not a section"):
        load_config(path, ["model.name_or_path.x=1"])


def test_unreadable_config_files(tmp_path):
    with pytest.raises(SftError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(SftError, match="line 2.*not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(SftError, match="expected a mapping of sections"):
        load_config(listy)


def test_run_names_cannot_escape_the_runs_folder():
    for name in ("../elsewhere", "a/b", ".."):
        with pytest.raises(SftError, match="output.name"):
            validate_config(minimal(output={"name": name}))


def test_remote_code_on_a_hub_model_needs_a_pinned_revision():
    with pytest.raises(SftError, match="revision"):
        validate_config(minimal(model={"name_or_path": "someone/model", "trust_remote_code": True}))
    validate_config(minimal(model={"name_or_path": "someone/model", "trust_remote_code": True, "revision": "abc123"}))


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"learning_rate": "fast"}, "train.learning_rate: expected float"),
        ({"per_device_train_batch_size": 0}, "train.per_device_train_batch_size: expected an integer >= 1"),
        ({"packing_strategy": "foo"}, "train.packing_strategy: expected one of"),
        ({"max_steps": -5}, "train.max_steps: expected -1"),
        ({"num_train_epochs": 0}, "train.num_train_epochs: expected a number of epochs > 0"),
        ({"resume_from_checkpoint": "x"}, "train.resume_from_checkpoint: not settable here"),
        ({"accelerator_config": "no-such-file.json"}, "train: trl.SFTConfig rejected these options"),
    ],
)
def test_train_values_that_would_only_fail_mid_run_are_caught_up_front(override, needle):
    with pytest.raises(SftError) as err:
        validate_config(minimal(train=override))
    assert needle in str(err.value)


def test_a_reporting_integration_that_is_not_installed_is_caught():
    from transformers.integrations import get_available_reporting_integrations

    if "wandb" in get_available_reporting_integrations():
        pytest.skip("wandb is installed here")
    with pytest.raises(SftError, match=r"train.report_to: \['wandb'\] not installed"):
        validate_config(minimal(train={"report_to": "wandb"}))


def test_a_resolved_config_validates_again(tmp_path):
    """The run folder's config.yaml (every default written out) must load as it is: `sft export RUN` reads it."""
    from sft.config import to_yaml

    raw = minimal(data={"train": "a.jsonl", "eval": "b.jsonl"})
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(validate_config(raw)))
    reloaded = load_config(path)
    assert reloaded.data == validate_config(raw).data and reloaded.model == validate_config(raw).model


def test_length_grouped_batches_only_when_packing_is_off(tmp_path):
    assert build_sft_config({}, tmp_path, 64).train_sampling_strategy == "random"  # packed rows: nothing to group
    assert build_sft_config({"packing": False}, tmp_path, 64).train_sampling_strategy == "group_by_length"
    chosen = build_sft_config({"packing": False, "train_sampling_strategy": "sequential"}, tmp_path, 64)
    assert chosen.train_sampling_strategy == "sequential"  # the user's choice wins
