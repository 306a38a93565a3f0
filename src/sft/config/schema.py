"""The sections of a run config as pydantic models that reject unknown keys; each setting documented on its field.

The `train` section is not re-declared here: it accepts any `trl.SFTConfig` option and is validated by building the
`SFTConfig` (see `sft.config.trl_args`).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TinyModelSpec(_Section):
    """Recipe for the local stand-in model, built when `model.name_or_path` does not exist yet.

    A random-weight Llama with a byte-level BPE tokenizer learnt from the training data. It exists so the whole
    pipeline runs offline on a CPU; point `model.name_or_path` at a hub id or a folder for real work.
    """

    seed: int = 0
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    vocab_size: int = Field(1024, ge=300, description="BPE vocabulary learnt from the training files")
    max_position_embeddings: int = 512
    initializer_range: float = Field(
        0.05, gt=0, description="Std of the random weights (0.05: the tied LM head can express confident logits)"
    )


class ModelConfig(_Section):
    name_or_path: str = Field(description="Hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct) or a local folder")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); pin it with remote code")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto = bfloat16 on a CUDA device that supports it, else float32"
    )
    attn_implementation: Literal["auto", "sdpa_packed", "sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "auto",
        description="auto = sdpa_packed where every layer is plain causal attention, else sdpa. sdpa_packed runs sdpa "
        "once per packed document (no T x T mask, no FLOPs across documents) and is plain sdpa everywhere else",
    )
    trust_remote_code: bool = Field(False, description="Run Python shipped with the model; off unless you trust it")
    allow_pickle: bool = Field(
        False,
        description="Also accept pickle weights (.bin/.pt) when a model has no safetensors; they are then read with "
        "torch's weights_only unpickler (tensors only, no code). Off: pickle weights are refused",
    )
    load_in_4bit: bool = Field(False, description="QLoRA: load the base in 4 bits with bitsandbytes (CUDA only)")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    chat_template: str | None = Field(
        None,
        description="Replace the tokenizer's chat template: a named template (chatml) or a .jinja file. None keeps "
        "the tokenizer's own. A named template's special tokens are added to the vocabulary if missing, the "
        "embeddings grow to fit and their new rows are trained and saved with the adapter",
    )
    tiny: TinyModelSpec | None = Field(
        None, description="Build a tiny random Llama at name_or_path when it does not exist (offline stand-in)"
    )

    @model_validator(mode="after")
    def _remote_code_needs_revision(self) -> ModelConfig:
        is_local = Path(self.name_or_path).exists() or self.tiny is not None
        if self.trust_remote_code and not is_local and self.revision is None:
            raise ValueError(
                "trust_remote_code=true on a hub model needs model.revision pinned to a commit, so the code that "
                "runs is the code you reviewed"
            )
        return self


FormatName = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"]


class RowTemplate(_Section):
    """A conversation built from arbitrary columns: each value is a `str.format` string over the row's columns.

    `{column}` inserts the column's value verbatim (braces inside the value stay text); `{{` and `}}` are literal
    braces in the template itself. Placeholders name columns only: no positions, attributes or indexing.
    """

    system: str | None = Field(None, description="System turn; dropped for a row where it renders empty")
    user: str = Field(description='User turn, e.g. "Translate to French: {english}"')
    assistant: str = Field(description='Assistant turn (what is learnt), e.g. "{french}"')

    @field_validator("system", "user", "assistant")
    @classmethod
    def _placeholders_name_columns(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            parts = list(string.Formatter().parse(value))
        except ValueError as err:
            raise ValueError(
                f"not a valid str.format template ({err}); write {{{{ and }}}} for literal braces"
            ) from None
        for _, name, spec, _ in parts:
            if name is None:
                continue
            if not name or name.isdigit() or any(c in name for c in ".[]"):
                raise ValueError(f"placeholder {{{name}}} must name a column, e.g. {{question}}")
            if spec and "{" in spec:
                raise ValueError(f"placeholder {{{name}}} has a nested placeholder in its format spec {spec!r}")
        return value


class SourceConfig(_Section):
    path: str = Field(
        description="A .jsonl, .json, .csv or .parquet file, a folder of them, a folder written by "
        "datasets' save_to_disk, or a Hugging Face hub dataset id (owner/name) when no such local path exists"
    )
    format: FormatName | Literal["template"] = Field(
        "auto", description="Detected from the columns when auto; 'template' when `template` is given"
    )
    extra_fields: Literal["error", "ignore"] = Field(
        "error", description="Row fields the format does not read (ids, metadata): an error, or ignored on purpose"
    )
    split: str = Field("train", description="Split of a hub dataset or of a saved DatasetDict")
    subset: str | None = Field(None, description="Configuration (subset) name of a hub dataset")
    roles: dict[str, Literal["system", "user", "assistant", "tool"]] | None = Field(
        None,
        description="ShareGPT role names of this source mapped to system/user/assistant/tool, added to the usual "
        "ones (human, gpt, system, function_call, observation), e.g. {bot: assistant, customer: user}",
    )
    weight: float = Field(
        1.0,
        gt=0,
        description="Training sources only. The rows of this source left for training after the train/eval split "
        "(so eval never holds repeated copies) are taken round(weight * rows) times, rounded half up: a fraction "
        "is a sample without replacement, above 1 whole copies plus a sampled remainder; seeded by data.seed",
    )
    columns: dict[str, str] | None = Field(
        None,
        description="Format field -> the file's column, applied before format detection, e.g. "
        "{instruction: question, output: answer} or {messages: dialog}",
    )
    template: RowTemplate | None = Field(
        None, description="Build each row's conversation from its columns (format becomes 'template')"
    )

    @model_validator(mode="after")
    def _template_or_format(self) -> SourceConfig:
        if self.template is not None:
            if self.format not in ("auto", "template"):
                raise ValueError(
                    f"template builds the conversation itself; drop format {self.format!r} (or set it to template)"
                )
            if self.columns:
                raise ValueError("template names the file's columns directly; drop columns")
            self.format = "template"
        elif self.format == "template":
            raise ValueError("format 'template' needs a template: {user: ..., assistant: ...}")
        if self.columns:
            taken = [c for c in set(self.columns.values()) if list(self.columns.values()).count(c) > 1]
            if taken:
                raise ValueError(
                    f"columns maps several fields to column(s) {sorted(taken)}; each column feeds one field"
                )
        return self


class DataConfig(_Section):
    train: list[SourceConfig] = Field(description="Training sources: a path, or a list of paths / {path, format}")
    eval: list[SourceConfig] | None = Field(None, description="Held-out sources; None: split eval_fraction off train")
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    seed: int = Field(0, description="Seed of the train/eval split")
    max_length: int = Field(1024, gt=0, description="Tokens per example after templating, answer and EOS included")
    on_too_long: Literal["drop", "error"] = Field(
        "drop", description="Rows longer than max_length are dropped and counted, or stop the run"
    )
    duplicates: Literal["warn", "error"] = Field(
        "warn", description="Exact duplicate rows and train/eval overlap: a warning, or stop the run"
    )
    cache_dir: str | None = Field(
        ".cache/sft", description="Tokenized data is cached here, keyed by everything that changes the tokens"
    )

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _paths_to_sources(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, (str, dict)):
            value = [value]
        if isinstance(value, list):
            value = [{"path": v} if isinstance(v, str) else v for v in value]
            weighted = [i for i, v in enumerate(value) if isinstance(v, dict) and v.get("weight", 1) != 1]
            if info.field_name == "eval" and weighted:
                raise ValueError(
                    f"eval source {weighted[0]} has a weight; weights mix training sources only (eval is scored "
                    "on every row as given)"
                )
        return value


class AdapterConfig(_Section):
    """LoRA through peft."""

    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0, description="Scale is alpha / r (alpha / sqrt(r) with rslora)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field("all-linear", description="'all-linear' or module names")
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = Field(None, description="Modules trained in full and saved with the adapter")
    bias: Literal["none", "all", "lora_only"] = "none"


class EvalConfig(_Section):
    enabled: bool = True
    compare_base: bool = Field(True, description="Also score the base model (adapter off) for a before/after table")
    max_samples: int | None = Field(200, gt=0, description="Held-out prompts to generate for; None: all")
    batch_size: int = Field(32, gt=0)
    max_new_tokens: int = Field(128, gt=0)
    benchmarks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks (e.g. [hellaswag, arc_easy]) run on the tuned model; needs the "
        "`bench` extra and access to the tasks' data, and is skipped with a message otherwise",
    )
    benchmark_limit: int | None = Field(200, gt=0, description="Examples per benchmark task; None: all")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding (then temperature, top_p, seed)")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0


class ExportConfig(_Section):
    merged: bool = Field(False, description="Also write base + adapter merged into one safetensors model")
    verify: bool = Field(
        True, description="Reload what was written in a fresh process; compare logits and greedy generations"
    )
    max_shard_size: str = Field("5GB", description="Largest safetensors shard of the merged model")


class OutputConfig(_Section):
    runs_dir: str = "runs"
    name: str | None = Field(None, description="Run folder name; default: the config file's name")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or "/" in value or "\\" in value or value in {".", ".."}):
            raise ValueError("must be a plain folder name (no '/', '\\', '.' or '..')")
        return value


class RunConfig(_Section):
    model: ModelConfig
    data: DataConfig
    adapter: AdapterConfig = AdapterConfig()
    train: dict[str, Any] = Field(default_factory=dict, description="Any trl.SFTConfig option")
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    output: OutputConfig = OutputConfig()
