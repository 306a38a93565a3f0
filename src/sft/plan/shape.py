"""What a plan is computed from: the model's shapes (config.json alone) and the run's settings (config + defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft.config import RunConfig
from sft.config.trl_args import defaults, trl_default
from sft.errors import SftError
from sft.plan.devices import Device

ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Fused projections of some families (Phi-3, ...) stand for several roles.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class ModelShape:
    """What memory and FLOPs depend on, from a decoder-only config.json."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    source: str
    packed_attention: bool = True  # every layer plain causal attention: `auto` runs sdpa_packed (sft.model.attention)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection of one decoder layer."""
        d, i = self.hidden, self.intermediate
        return {
            "q_proj": (d, self.q_dim),
            "k_proj": (d, self.kv_dim),
            "v_proj": (d, self.kv_dim),
            "o_proj": (self.q_dim, d),
            "gate_proj": (d, i),
            "up_proj": (d, i),
            "down_proj": (i, d),
        }

    @property
    def decoder_linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears().values())

    @property
    def other_params(self) -> int:
        """Embeddings, an untied LM head and the norms: what QLoRA leaves unquantized."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.decoder_linear_params + self.other_params


def model_shape(model_config: Any, source: str = "config.json") -> ModelShape:
    """The shapes of a decoder-only model from its (text) config; a clear error when they are not there."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [f for f in fields if getattr(text, f, None) is None]
    if missing:
        raise SftError(
            f"{source}: no {', '.join(missing)}; `sft plan` needs a decoder-only transformer config "
            "(hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, vocab_size)"
        )
    from sft.model.attention import supports_packed

    heads = text.num_attention_heads
    return ModelShape(
        model_type=getattr(text, "model_type", "?"),
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
        tied=bool(getattr(model_config, "tie_word_embeddings", getattr(text, "tie_word_embeddings", False))),
        source=source,
        packed_attention=supports_packed(model_config),
    )


def read_model_config(config: RunConfig) -> tuple[Any, str]:
    """config.json of the model, or the stand-in's when `model.tiny` will build it; and where it came from."""
    from sft.model import load_model_config

    path = Path(config.model.name_or_path)
    if not path.exists() and config.model.tiny is not None:
        from sft.model.tiny import stand_in_config

        return stand_in_config(config.model.tiny), "model.tiny (stand-in not built yet; vocabulary at most)"
    return load_model_config(config.model), str(path / "config.json") if path.is_dir() else config.model.name_or_path


@dataclass(frozen=True)
class Settings:
    """Everything about a run that changes its memory or compute."""

    device: str  # "cuda" or "cpu"
    compute: str  # "fp32" or "bf16" (autocast, or bf16 weights)
    weight_bytes: int  # 4 or 2, of the parameters as loaded
    load_in_4bit: bool
    double_quant: bool
    batch: int  # rows per micro-batch
    accumulation: int
    max_length: int
    packing: bool
    padding_free: bool
    checkpointing: bool
    attention: str
    eval_batch: int
    eval_enabled: bool
    gen_batch: int
    gen_new_tokens: int
    lora_r: int
    lora_roles: tuple[str, ...]
    use_dora: bool
    full_modules: tuple[str, ...]  # modules_to_save trained in full (embed_tokens, lm_head)
    labelled_head: bool = True  # training's loss is sft.model.loss's (a frozen LM head); else TRL's fused head

    @property
    def tokens(self) -> int:
        """Tokens in one forward pass: packed rows are flattened into one row (padding-free); others pad to the
        longest row, at most max_length."""
        return self.batch * self.max_length

    @property
    def single_row(self) -> bool:
        return self.padding_free

    def describe(self) -> str:
        layout = (
            "packed, padding-free"
            if self.packing and self.padding_free
            else "packed"
            if self.packing
            else ("padding-free" if self.padding_free else "padded to the longest row")
        )
        return (
            f"{self.batch} rows x {self.max_length} tokens = {self.tokens:,} tokens per micro-batch ({layout}), "
            f"x{self.accumulation} accumulation = {self.tokens * self.accumulation:,} tokens per optimizer step"
        )


def train_value(config: RunConfig, name: str, auto: dict[str, Any] | None = None) -> Any:
    """A train option as the run will see it: the config's train section, else auto settings, else this
    pipeline's defaults, else TRL's."""
    if name == "activation_checkpointing" and "gradient_checkpointing" in config.train:
        return config.train["gradient_checkpointing"]
    for source in (config.train, auto or {}, defaults()):
        if name in source:
            return source[name]
    return trl_default(name)


def lora_roles(target_modules: str | list[str]) -> tuple[str, ...]:
    if target_modules == "all-linear":
        return ROLES
    names = [target_modules] if isinstance(target_modules, str) else target_modules
    roles = {role for name in names for role in FUSED.get(name.split(".")[-1], (name.split(".")[-1],))}
    return tuple(r for r in ROLES if r in roles)


def settings_for(config: RunConfig, shape: ModelShape, device: Device, compute: str, checkpointing: bool) -> Settings:
    packing = bool(train_value(config, "packing"))
    strategy = train_value(config, "packing_strategy")
    padding_free = bool(train_value(config, "padding_free")) or (packing and strategy in ("bfd", "bfd_split"))
    dtype = config.model.dtype
    weight_bytes = 4 if dtype == "float32" or (dtype == "auto" and device.kind == "cpu") else 2
    eval_batch = int(train_value(config, "per_device_eval_batch_size"))
    eval_strategy = str(train_value(config, "eval_strategy"))
    full_modules = tuple(m for m in (config.adapter.modules_to_save or []) if m in ("embed_tokens", "lm_head"))
    return Settings(
        device=device.kind,
        compute=compute,
        weight_bytes=weight_bytes,
        load_in_4bit=config.model.load_in_4bit,
        double_quant=config.model.bnb_4bit_use_double_quant,
        batch=int(train_value(config, "per_device_train_batch_size")),
        accumulation=int(train_value(config, "gradient_accumulation_steps")),
        max_length=config.data.max_length,
        packing=packing,
        padding_free=padding_free,
        checkpointing=checkpointing,
        attention=_attention(config.model.attn_implementation, shape),
        eval_batch=eval_batch,
        eval_enabled=eval_strategy not in ("no", "IntervalStrategy.NO"),
        gen_batch=config.eval.batch_size if config.eval.enabled else 0,
        gen_new_tokens=config.eval.max_new_tokens,
        lora_r=config.adapter.r,
        lora_roles=lora_roles(config.adapter.target_modules),
        use_dora=config.adapter.use_dora,
        full_modules=full_modules,
        labelled_head=not ("lm_head" in full_modules or (shape.tied and "embed_tokens" in full_modules)),
    )


def _attention(requested: str, shape: ModelShape) -> str:
    if requested == "auto":
        return "sdpa_packed" if shape.packed_attention else "sdpa"
    return requested


def lora_params(shape: ModelShape, s: Settings) -> int:
    linears = shape.linears()
    per_layer = sum(
        s.lora_r * (linears[r][0] + linears[r][1]) + (linears[r][1] if s.use_dora else 0) for r in s.lora_roles
    )
    full = sum(shape.vocab * shape.hidden for _ in s.full_modules)
    return shape.layers * per_layer + full
