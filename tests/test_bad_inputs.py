"""Bad inputs through the real CLI, one subprocess each: configs, data files, model files, exports.

Every case must end with exit code 2 and exactly one `sft: error: ` message that names the offending thing (file,
line or row, key path) and what was expected; no traceback; and nothing half-written: the case's folder (its
inputs, runs dir and cache dir; the command runs there too) holds exactly the files it held before, byte for byte,
so no run folder, no temporary or staging file and no edited input. The one thing allowed to appear is a complete
entry of the tokenized-data cache, for cases that fail on the weights after the data was tokenized.

Most cases build their own inputs from a tiny stand-in model built once per module; a few use real third-party
files from tests/fixtures. The cases run three at a time in a module fixture (each subprocess imports torch,
transformers and trl, ~5 s of CPU); each test then asserts on its case's result.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from tests.conftest import shared
from tests.test_cli import assert_user_error, sft
from tests.test_pipeline import ROOT, tiny_config

# A good conversation in the stand-in's vocabulary (the reverse task), for files that are bad in one row only.
GOOD = {
    "messages": [{"role": "user", "content": "reverse: the cat sat"}, {"role": "assistant", "content": "sat cat the"}]
}


@dataclass(frozen=True)
class Case:
    build: Callable[[Path, SimpleNamespace], list[str]]  # writes the case's inputs, returns the CLI arguments
    needles: tuple[str, ...]  # each must appear in stderr; "{case}" is the case's folder
    absent: tuple[str, ...] = ()  # must appear in neither stdout nor stderr (a payload's output)


CASES: dict[str, Case] = {}


def case(name: str, *needles: str, absent: tuple[str, ...] = ()):
    def register(build: Callable[[Path, SimpleNamespace], list[str]]):
        assert name not in CASES, name
        CASES[name] = Case(build, needles, absent)
        return build

    return register


def base_config(folder: Path, inputs: SimpleNamespace) -> dict:
    """tiny_config on the prebuilt stand-in and a few good rows; runs, cache and outputs inside the case's folder."""
    config = tiny_config(folder, max_steps=2)
    config["model"] = {"name_or_path": str(inputs.model)}
    config["data"].update(train=str(inputs.train), eval=str(inputs.eval), cache_dir=str(folder / "cache"))
    config["export"] = {"merged": False, "verify": False}
    return config


def write_config(folder: Path, config: dict | str | bytes, name: str = "run.yaml") -> Path:
    path = folder / name
    if isinstance(config, dict):
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    elif isinstance(config, str):
        path.write_text(config)
    else:
        path.write_bytes(config)
    return path


def train_with(folder: Path, inputs: SimpleNamespace, *overrides: str, edit: Callable[[dict], None] | None = None):
    """`sft train` on the base config, changed by `edit` and the dotted overrides."""
    config = base_config(folder, inputs)
    if edit is not None:
        edit(config)
    return ["train", str(write_config(folder, config)), *overrides]


def data_file(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def train_on(folder: Path, inputs: SimpleNamespace, path: Path, *overrides: str, command: str = "train"):
    args = train_with(folder, inputs, f"data.train={path}", *overrides)
    return [command, *args[1:]]


def model_copy(folder: Path, inputs: SimpleNamespace) -> Path:
    return Path(shutil.copytree(inputs.model, folder / "model"))


def train_model(folder: Path, inputs: SimpleNamespace, model: Path) -> list[str]:
    return train_with(folder, inputs, f"model.name_or_path={model}")


def jsonl(*rows: dict) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def chat(*turns: tuple[str, object]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


# Config files


@case("config_missing", "{case}/absent.yaml", "config file not found", "expected a YAML file")
def _(folder, inputs):
    return ["train", str(folder / "absent.yaml")]


@case("config_yaml_syntax", "{case}/run.yaml: line 5, column 14", "not valid YAML")
def _(folder, inputs):
    text = f"model:\n  name_or_path: {inputs.model}\ndata:\n  train: {inputs.train}\n   max_length: 64\n"
    return ["train", str(write_config(folder, text))]


@case("config_not_a_mapping", "{case}/run.yaml", "expected a mapping of sections", "got list")
def _(folder, inputs):
    return ["train", str(write_config(folder, "- model\n- data\n"))]


@case("config_empty", "{case}/run.yaml", "empty", "expected a mapping of sections")
def _(folder, inputs):
    return ["train", str(write_config(folder, "# nothing here yet\n"))]


@case("config_misspelt_key", "{case}/run.yaml", "adapter.alpah: unknown key", "did you mean 'alpha'")
def _(folder, inputs):
    return train_with(folder, inputs, edit=lambda c: c["adapter"].update(alpah=4))


@case("config_unknown_section", "trainer: unknown key", "did you mean 'train'")
def _(folder, inputs):
    return train_with(folder, inputs, edit=lambda c: c.update(trainer={"max_steps": 2}))


@case("config_wrong_type", "{case}/run.yaml", "adapter.r", "valid integer", "'eight'")
def _(folder, inputs):
    return ["check", *train_with(folder, inputs, edit=lambda c: c["adapter"].update(r="eight"))[1:]]


@case("config_out_of_range", "data.eval_fraction", "less than 1", "(got 1.5)")
def _(folder, inputs):
    return ["check", *train_with(folder, inputs, edit=lambda c: c["data"].update(eval_fraction=1.5))[1:]]


@case("config_train_value_type", "train.learning_rate", "expected float", "'fast'")
def _(folder, inputs):
    return train_with(folder, inputs, edit=lambda c: c["train"].update(learning_rate="fast"))


@case("config_reserved_train_key", "train.output_dir: not settable here")
def _(folder, inputs):
    return train_with(folder, inputs, edit=lambda c: c["train"].update(output_dir=str(folder / "elsewhere")))


@case("config_unknown_sftconfig_option", "train.learning_rat: not a trl.SFTConfig option", "'learning_rate'")
def _(folder, inputs):
    return train_with(folder, inputs, edit=lambda c: c["train"].update(learning_rat=1e-3))


@case("config_duplicate_key", "{case}/run.yaml: line 6", "duplicate key 'max_length' (first given on line 5)")
def _(folder, inputs):
    text = (
        f"model:\n  name_or_path: {inputs.model}\ndata:\n  train: {inputs.train}\n  max_length: 64\n  max_length: 8\n"
    )
    return ["train", str(write_config(folder, text))]


@case("config_not_utf8", "{case}/run.yaml", "not UTF-8: byte 0xe9 at offset 19 (line 1)", "expected UTF-8")
def _(folder, inputs):
    return ["train", str(write_config(folder, b"# tuned for the caf\xe9 dataset\nmodel: {name_or_path: m}\n"))]


@case("config_python_tag", "{case}/run.yaml: line 1", "not valid YAML", "could not determine a constructor")
def _(folder, inputs):
    # Unsafe YAML would run this on load and create the marker file, which the snapshot check would see.
    return ["train", str(write_config(folder, f"model: !!python/object/apply:os.mkdir ['{folder}/pwned']\n"))]


@case("override_syntax", "override 'train.learning_rate'", "expected KEY.PATH=VALUE")
def _(folder, inputs):
    return train_with(folder, inputs, "train.learning_rate")


@case("override_unknown_key", "model.nme_or_path: unknown key", "did you mean 'name_or_path'")
def _(folder, inputs):
    return train_with(folder, inputs, f"model.nme_or_path={inputs.model}")


@case("run_name_escapes", "output.name", "plain folder name", "'../escaped'")
def _(folder, inputs):
    return train_with(folder, inputs, "output.name=../escaped")


@case("run_name_absolute", "output.name", "plain folder name", "{case}/absolute")
def _(folder, inputs):
    return train_with(folder, inputs, f"output.name={folder / 'absolute'}")


@case("runs_dir_is_a_file", "output.runs_dir=", "{case}/runs is a file, not a folder")
def _(folder, inputs):
    (folder / "runs").write_text("not a folder\n")
    return train_with(folder, inputs)


@case("remote_code_unpinned", "model", "trust_remote_code=true on a hub model", "model.revision pinned to a commit")
def _(folder, inputs):
    return train_with(folder, inputs, "model.name_or_path=some-org/some-model", "model.trust_remote_code=true")


@case("four_bit_on_cpu", "model.load_in_4bit=true", "needs a CUDA GPU")
def _(folder, inputs):
    return train_with(folder, inputs, "model.load_in_4bit=true")


@case("resume_without_a_run", "nothing to resume", "no run of 't' under {case}/runs", "start one without --resume")
def _(folder, inputs):
    return [*train_with(folder, inputs), "--resume"]


# Data files


@case("data_missing", "data file not found: {case}/nowhere/train.jsonl")
def _(folder, inputs):
    return train_on(folder, inputs, folder / "nowhere" / "train.jsonl")


@case("data_malformed_line", "{case}/train.jsonl line 3", "malformed JSON", "expected one JSON object per line")
def _(folder, inputs):
    path = data_file(folder, "train.jsonl", jsonl(GOOD, GOOD) + '{"messages": [{"role": "user", "content": "hi"}\n')
    return train_on(folder, inputs, path)


@case("data_empty", "{case}/train.jsonl", "file is empty", "expected at least one row")
def _(folder, inputs):
    return train_on(folder, inputs, data_file(folder, "train.jsonl", "\n\n"))


@case("data_missing_field", "{case}/train.jsonl line 2, messages[0]", "unknown role None", "expected one of")
def _(folder, inputs):
    path = data_file(folder, "train.jsonl", jsonl(GOOD, {"messages": [{"content": "hi"}, GOOD["messages"][1]]}))
    return train_on(folder, inputs, path)


@case("data_unknown_role", "{case}/train.jsonl line 1, messages[1]", "unknown role 'bot'", "expected one of")
def _(folder, inputs):
    path = data_file(folder, "train.jsonl", jsonl(chat(("user", "hi"), ("bot", "hello"))))
    return train_on(folder, inputs, path, command="data")


@case(
    "data_empty_answer", "{case}/train.jsonl line 2, messages[1]: empty assistant turn", "expected an answer to learn"
)
def _(folder, inputs):
    return train_on(
        folder, inputs, data_file(folder, "train.jsonl", jsonl(GOOD, chat(("user", "hi"), ("assistant", ""))))
    )


@case("data_ends_with_user", "{case}/train.jsonl line 1", "expected it to end with the assistant")
def _(folder, inputs):
    path = data_file(folder, "train.jsonl", jsonl(chat(("user", "hi"), ("assistant", "hello"), ("user", "and?"))))
    return train_on(folder, inputs, path)


@case("data_special_token", "{case}/train.jsonl line 1", "literal special token '<|im_end|>'", "expected plain text")
def _(folder, inputs):
    path = data_file(folder, "train.jsonl", jsonl(chat(("user", "reverse: a b<|im_end|>"), ("assistant", "b a"))))
    return train_on(folder, inputs, path, command="data")


@case("data_every_row_too_long", "{case}/train.jsonl line 1", "over data.max_length=8", "data.on_too_long=drop")
def _(folder, inputs):
    path = data_file(folder, "train.jsonl", jsonl(GOOD, GOOD))
    return train_on(folder, inputs, path, "data.max_length=8", "data.on_too_long=error")


@case("data_not_utf8", "{case}/train.jsonl", "not UTF-8: byte 0xe9", "(line 2)", "expected UTF-8 text")
def _(folder, inputs):
    cp1252 = '{"messages": [{"role": "user", "content": "reverse: caf\xe9"}, {"role": "assistant", "content": "x"}]}'
    return train_on(folder, inputs, data_file(folder, "train.jsonl", jsonl(GOOD).encode() + cp1252.encode("cp1252")))


@case(
    "data_lone_surrogate",
    "{case}/train.jsonl line 2, messages[0]",
    "lone surrogate U+DCE9",
    "expected valid Unicode text",
)
def _(folder, inputs):
    # Valid UTF-8 and valid JSON, but "\udce9" decodes to half a UTF-16 pair, which no tokenizer can encode.
    return train_on(
        folder, inputs, data_file(folder, "train.jsonl", jsonl(GOOD, chat(("user", "caf\udce9"), ("assistant", "x"))))
    )


@case("data_wrong_extension", "{case}/train.txt", "unsupported file type '.txt'", "expected .jsonl")
def _(folder, inputs):
    return train_on(folder, inputs, data_file(folder, "train.txt", jsonl(GOOD)))


@case("data_array_in_jsonl", "{case}/train.jsonl", "one JSON array, not JSON Lines", "train.json")
def _(folder, inputs):
    return train_on(folder, inputs, data_file(folder, "train.jsonl", json.dumps([GOOD, GOOD], indent=1)))


@case("data_bad_eval_file", "{case}/eval.jsonl line 1", "field 'messages' must be a non-empty list of turns")
def _(folder, inputs):
    return train_on(
        folder, inputs, inputs.train, f"data.eval={data_file(folder, 'eval.jsonl', jsonl({'messages': []}))}"
    )


@case(
    "data_preference_real",
    "{case}/dpo_en_demo.json row 0",
    "preference data",
    "expected one of",
)
def _(folder, inputs):
    return train_on(folder, inputs, Path(shutil.copy(shared("datasets/llamafactory/dpo_en_demo.json"), folder)))


# Model files (each case edits its own copy of the stand-in)


@case(
    "model_without_config_json",
    "model.name_or_path='{case}/model'",
    "the folder has no config.json",
    "expected a model folder with config.json",
)
def _(folder, inputs):
    model = model_copy(folder, inputs)
    (model / "config.json").unlink()
    return train_model(folder, inputs, model)


@case(
    "model_invalid_config_json",
    "model.name_or_path='{case}/model'",
    "config.json is not valid JSON (line 2, column 1",
    "expected the file as the model was saved",
)
def _(folder, inputs):
    model = model_copy(folder, inputs)
    (model / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,\n')
    return train_model(folder, inputs, model)


@case(
    "model_truncated_safetensors",
    "model.name_or_path='{case}/model'",
    "model.safetensors is not a readable safetensors file",
    "expected complete *.safetensors",
)
def _(folder, inputs):
    model = model_copy(folder, inputs)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return train_model(folder, inputs, model)


@case(
    "model_weights_do_not_fit_config",
    "model.name_or_path='{case}/model'",
    "the weights do not fit config.json",
    "in model.safetensors but config.json makes it",
    "expected the config.json the weights were saved with",
)
def _(folder, inputs):
    model = model_copy(folder, inputs)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "hidden_size": 32, "head_dim": 16}))
    return train_model(folder, inputs, model)


class _Payload:
    """Unpickling this creates a folder: proof that the weights were unpickled, which must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


@case(
    "model_pickle_only",
    "model.name_or_path='{case}/model'",
    "only pickle weights (pytorch_model.bin)",
    "expected *.safetensors",
)
def _(folder, inputs):
    model = model_copy(folder, inputs)
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(folder / "pwned")))
    return train_model(folder, inputs, model)


@case(
    "model_pickle_exploit_real",
    "model.name_or_path='{case}/model'",
    "only pickle weights",
    "expected *.safetensors",
    absent=("456",),  # the payload is eval("print('456')")
)
def _(folder, inputs):
    model = model_copy(folder, inputs)
    (model / "model.safetensors").unlink()
    shutil.copy(shared("security/malicious1_v4.pkl"), model / "pytorch_model.bin")
    return train_model(folder, inputs, model)


@case(
    "model_without_tokenizer",
    "model.name_or_path='{case}/model'",
    "the folder has no tokenizer files",
    "expected tokenizer files",
)
def _(folder, inputs):
    model = model_copy(folder, inputs)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model / name).unlink()
    return train_model(folder, inputs, model)


@case(
    "model_corrupt_tokenizer",
    "model.name_or_path='{case}/model'",
    "tokenizer.json is not valid JSON (line 1",
    "expected the file as the model was saved",
)
def _(folder, inputs):
    model = model_copy(folder, inputs)
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    return train_model(folder, inputs, model)


@case(
    "model_legacy_tokenizer_real",
    "model.name_or_path='{case}/model'",
    "could not load the tokenizer",
    "Merges text file invalid",
    "expected tokenizer files",
)
def _(folder, inputs):
    model = model_copy(folder, inputs)
    shutil.copy(shared("negative/llama2_legacy_tokenizer.json"), model / "tokenizer.json")
    return train_model(folder, inputs, model)


@case(
    "model_embeddings_smaller_than_vocab",
    "model.name_or_path='{case}/model'",
    "model has 100 embedding rows (config.json vocab_size)",
    "expected at least",
)
def _(folder, inputs):
    model = model_copy(folder, inputs)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    return train_model(folder, inputs, model)


@case(
    "model_remote_code_not_trusted",
    "model.name_or_path='{case}/model'",
    "asks to run the model's own Python code",
    "model.trust_remote_code: true",
)
def _(folder, inputs):
    model = model_copy(folder, inputs)
    config = json.loads((model / "config.json").read_text())
    auto_map = {"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"}
    (model / "config.json").write_text(json.dumps({**config, "model_type": "custom-llama", "auto_map": auto_map}))
    (model / "custom.py").write_text(f"import os\nos.mkdir({str(folder / 'pwned')!r})\n")
    return train_model(folder, inputs, model)


# Exports: `sft generate` on adapters that do not load


@case(
    "generate_invalid_adapter_config",
    "{case}/adapter/adapter_config.json: not a JSON object",
    "expected the adapter_config.json peft writes",
)
def _(folder, inputs):
    adapter = Path(shutil.copytree(inputs.adapter, folder / "adapter"))
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": ')
    return ["generate", str(adapter), "--prompt", "reverse: a b"]


@case(
    "generate_truncated_adapter_weights",
    "{case}/adapter: the adapter did not load",
    "expected adapter_config.json and a complete adapter_model.safetensors",
)
def _(folder, inputs):
    adapter = Path(shutil.copytree(inputs.adapter, folder / "adapter"))
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return ["generate", str(adapter), "--prompt", "reverse: a b"]


# Running the cases


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder` (hidden ones included) -> sha256 of its bytes, or "dir"."""
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def build_inputs(folder: Path) -> SimpleNamespace:
    """The stand-in model (built once), an adapter on it, and a few good rows of its task."""
    from peft import get_peft_model

    from sft.config import validate_config
    from sft.data import corpus, load_dataset
    from sft.model import build_lora_config, ensure_tiny_model, load_model, load_tokenizer

    config = validate_config(tiny_config(folder))
    assert ensure_tiny_model(config.model, corpus(load_dataset(config.data)))
    lines = (ROOT / "data/reverse/train.jsonl").read_text().splitlines()
    (folder / "train.jsonl").write_text("\n".join(lines[:16]) + "\n")
    (folder / "eval.jsonl").write_text("\n".join(lines[16:24]) + "\n")
    adapter = folder / "adapter"
    get_peft_model(load_model(config.model), build_lora_config(config.adapter, [], None)).save_pretrained(adapter)
    load_tokenizer(config.model).save_pretrained(adapter)
    return SimpleNamespace(
        model=Path(config.model.name_or_path), adapter=adapter, train=folder / "train.jsonl", eval=folder / "eval.jsonl"
    )


def run_case(name: str, root: Path, inputs: SimpleNamespace) -> SimpleNamespace:
    spec = CASES[name]
    folder = root / name
    folder.mkdir()
    args = spec.build(folder, inputs)
    before = snapshot(folder)
    result = sft(*args, cwd=folder, timeout=300)
    return SimpleNamespace(result=result, before=before, after=snapshot(folder), folder=folder)


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory) -> SimpleNamespace:
    """Every selected case, run three at a time (2-core machine: one process loads while the others compute)."""
    selected = {
        item.callspec.params["name"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "name" in item.callspec.params
    }
    root = tmp_path_factory.mktemp("bad_inputs")
    inputs = build_inputs(root / "inputs")
    inputs_before = snapshot(root / "inputs")
    with pytest.MonkeyPatch.context() as patch, ThreadPoolExecutor(max_workers=3) as pool:
        patch.setenv("HF_HUB_OFFLINE", "1")  # a case that escaped its checks must not reach the network
        names = [n for n in CASES if n in selected]
        done = dict(zip(names, pool.map(lambda n: run_case(n, root, inputs), names)))
    return SimpleNamespace(cases=done, inputs_unchanged=snapshot(root / "inputs") == inputs_before)


def test_the_suite_covers_configs_data_and_models():
    assert len(CASES) >= 35
    for family in ("config", "data", "model"):
        assert sum(name.startswith(family) for name in CASES) >= 8, family


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_cleanly(name: str, outcomes: SimpleNamespace):
    spec = CASES[name]
    if name == "four_bit_on_cpu" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    outcome = outcomes.cases[name]
    stderr = outcome.result.stderr
    assert_user_error(outcome.result, *(n.format(case=outcome.folder) for n in spec.needles))
    assert sum(line.startswith("sft: error: ") for line in stderr.splitlines()) == 1, stderr
    # A complete, atomically written entry of the tokenized-data cache may stay (a run fails on its weights after
    # tokenizing; the entry is valid and reused by the next run); anything else new is a half-written output.
    added = sorted(k for k in set(outcome.after) - set(outcome.before) if k.split("/")[0] != "cache")
    assert not added, f"written despite the error: {added}"
    changed = sorted(k for k in outcome.before if outcome.after.get(k) != outcome.before[k])
    assert not changed, f"inputs changed or removed: {changed}"
    assert not [p for p in outcome.folder.rglob("*") if ".tmp" in p.name or ".staging" in p.name]
    for text in spec.absent:
        assert text not in outcome.result.stdout + stderr


def test_shared_inputs_are_untouched(outcomes: SimpleNamespace):
    """The stand-in model, its adapter and the good rows every case reads are byte for byte what they were."""
    assert outcomes.inputs_unchanged
