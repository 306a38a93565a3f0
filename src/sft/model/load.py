"""Load the base model, its config and its tokenizer, checked against each other: the only place these are built."""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sft.config import ModelConfig
from sft.errors import SftError
from sft.model import attention
from sft.model.templates import NAMED_TEMPLATES, TEMPLATE_TOKENS


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def _source_kwargs(config: ModelConfig) -> dict:
    return {"revision": config.revision, "trust_remote_code": config.trust_remote_code}


# What a model folder must hold for each loader, said in every load error.
EXPECTED = {
    "model config": "expected a config.json whose model_type this transformers version supports",
    "tokenizer": "expected tokenizer files this transformers version reads (tokenizer.json, or tokenizer_config.json "
    "with its vocabulary files)",
    "model weights": "expected complete *.safetensors files whose tensors match config.json",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model", "*.model")
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _load_error(config: ModelConfig, what: str, err: Exception) -> SftError:
    where = config.name_or_path
    looks_local = where.startswith(("/", ".", "~")) or where.count("/") != 1
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if not Path(where).exists() and looks_local:
        return SftError(
            f"model.name_or_path={where!r}: no such folder (and not a hub id of the form owner/name); expected a "
            "model folder or a hub id"
        )
    if "custom code" in str(err) or "trust_remote_code" in str(err):
        return SftError(
            f"model.name_or_path={where!r}: its config asks to run the model's own Python code (auto_map) and "
            "model.trust_remote_code is false; expected a model type this transformers version supports, or set "
            "model.trust_remote_code: true once you have reviewed that code"
        )
    if not Path(where).exists():
        hint = "not a local folder; as a hub id it could not be fetched (offline? gated? misspelt?)"
    else:
        hint = "the folder exists but its files did not load"
    expected = next(text for key, text in EXPECTED.items() if what.startswith(key))
    return SftError(f"model.name_or_path={where!r}: could not load the {what}: {hint} ({first}); {expected}")


def _check_json_files(config: ModelConfig, names: tuple[str, ...]) -> None:
    """In a local folder, a JSON file that does not parse is named with its line before transformers reads it:
    transformers' own messages omit the file, or blame another loader (the tokenizer reads config.json too)."""
    folder = Path(config.name_or_path)
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        prefix = f"model.name_or_path={config.name_or_path!r}: {name}"
        try:
            value = json.loads(path.read_bytes())
        except UnicodeDecodeError as err:
            raise SftError(f"{prefix} is not UTF-8 (byte {err.start}); expected a UTF-8 JSON file") from None
        except json.JSONDecodeError as err:
            raise SftError(
                f"{prefix} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); expected the file "
                "as the model was saved - it may be truncated or edited"
            ) from None
        if not isinstance(value, dict):
            raise SftError(f"{prefix} holds a JSON {type(value).__name__}; expected a JSON object")


def load_model_config(config: ModelConfig):
    """The model's config.json alone: enough to check vocabularies and plan memory before loading weights."""
    folder = Path(config.name_or_path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise SftError(
            f"model.name_or_path={config.name_or_path!r}: the folder has no config.json; expected a model folder "
            "with config.json, *.safetensors weights and tokenizer files (as save_pretrained writes them)"
        )
    _check_json_files(config, ("config.json", "generation_config.json"))
    try:
        return AutoConfig.from_pretrained(config.name_or_path, **_source_kwargs(config))
    except (OSError, ValueError) as err:
        raise _load_error(config, "model config", err) from None


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    folder = Path(config.name_or_path)
    _check_json_files(config, ("config.json", *TOKENIZER_JSON))  # AutoTokenizer reads config.json too
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.name_or_path, **_source_kwargs(config))
    except Exception as err:  # tokenizers raises bare Exceptions for corrupt files
        if folder.is_dir() and not any(next(folder.glob(name), None) for name in TOKENIZER_FILES):
            where = f"model.name_or_path={config.name_or_path!r}"
            raise SftError(f"{where}: the folder has no tokenizer files; {EXPECTED['tokenizer']}") from None
        if list(Path(config.name_or_path).glob("*.model")) and importlib.util.find_spec("sentencepiece") is None:
            raise SftError(
                f"model.name_or_path={config.name_or_path!r}: its tokenizer is a SentencePiece .model file, which "
                "needs the sentencepiece and protobuf packages: pip install sentencepiece protobuf"
            ) from None
        raise _load_error(config, "tokenizer", err) from None
    if config.chat_template in NAMED_TEMPLATES:
        template, tokens = NAMED_TEMPLATES[config.chat_template]
        tokenizer.chat_template = template
        missing = [t for t in tokens if t not in tokenizer.get_vocab()]
        if missing:  # the embeddings grow to fit them (load_model) and their rows are trained (apply_lora)
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    elif config.chat_template is not None:
        path = Path(config.chat_template)
        if not path.is_file():
            raise SftError(
                f"model.chat_template={config.chat_template!r}: neither a named template "
                f"({', '.join(NAMED_TEMPLATES)}) nor an existing .jinja file"
            )
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    ensure_pad_token(tokenizer)
    # Left padding for batched generation: new tokens follow the prompt directly. Training pads with -100 labels.
    tokenizer.padding_side = "left"
    return tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token without adding one to the vocabulary.

    Reusing EOS (or UNK) as pad is safe here because labels come from explicit answer spans, never from
    `input_ids == pad_id`: padding can never mask the EOS the model must learn.
    """
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token


def embedding_rows(model_config) -> int | None:
    rows = getattr(model_config, "vocab_size", None)
    if rows is None and hasattr(model_config, "get_text_config"):
        rows = model_config.get_text_config().vocab_size
    return rows


def rows_needed(tokenizer: PreTrainedTokenizerBase) -> int:
    """Embedding rows the tokenizer's ids need: its largest id + 1, which is more than len(tokenizer) for a
    vocabulary with holes (a trimmed Phi-4 vocabulary has 63,668 tokens with ids up to 100,351)."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)


def ids_past(tokenizer: PreTrainedTokenizerBase, rows: int) -> dict[str, int]:
    return {token: i for token, i in tokenizer.get_vocab().items() if i >= rows}


def check_vocab(tokenizer: PreTrainedTokenizerBase, model_config) -> None:
    """Every id the tokenizer can produce must have an embedding row (rows may be more: Qwen2.5 pads to 151936).

    Past the last row only a named template's special tokens are allowed: the embeddings grow to fit them.
    """
    rows = embedding_rows(model_config)
    if rows is None or rows_needed(tokenizer) <= rows:
        return
    if not set(ids_past(tokenizer, rows)) <= TEMPLATE_TOKENS:
        where = getattr(model_config, "name_or_path", "")
        raise SftError(
            (f"model.name_or_path={where!r}: " if where else "")
            + f"the tokenizer's ids run to {rows_needed(tokenizer) - 1} but the model has {rows} embedding rows "
            f"(config.json vocab_size): ids past {rows - 1} would index nothing; expected at least "
            f"{rows_needed(tokenizer)} rows. The tokenizer does not belong to this model (or tokens were added "
            "without resizing the embeddings)"
        )


def build_quantization_config(config: ModelConfig):
    """The one place a BitsAndBytesConfig is built (QLoRA)."""
    if not config.load_in_4bit:
        return None
    if not torch.cuda.is_available():
        raise SftError(
            "model.load_in_4bit=true needs a CUDA GPU (bitsandbytes 4-bit kernels); none is visible. "
            "Set model.load_in_4bit=false to train in full precision on this machine"
        )
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise SftError("model.load_in_4bit=true needs bitsandbytes: pip install 'sft[gpu]'") from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=config.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=resolve_dtype(config.bnb_4bit_compute_dtype),
    )


def set_attention(model: PreTrainedModel, requested: str, where: str = "") -> str:
    """`auto` and `sdpa_packed` load as sdpa, then switch to sdpa_packed where every layer is plain causal attention
    (see sft.model.attention). Returns the implementation the model now uses."""
    if requested == attention.NAME and not attention.supports_packed(model.config):
        raise SftError(
            f"model.attn_implementation={attention.NAME!r}: {where or 'the model'} has layers that are not plain "
            "causal attention (a sliding window, chunked attention or logit soft-capping), which per-document "
            "sdpa would not reproduce; expected auto or sdpa for this model"
        )
    if attention.resolve(requested, model.config) == attention.NAME:
        model.set_attn_implementation(attention.NAME)
    return model.config._attn_implementation


def load_model(config: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """The base model; with a tokenizer that has grown (a named template's tokens), embeddings grow to fit it."""
    kwargs = dict(
        dtype=resolve_dtype(config.dtype),
        attn_implementation="sdpa"
        if config.attn_implementation in ("auto", attention.NAME)
        else config.attn_implementation,
        quantization_config=build_quantization_config(config),
        use_safetensors=None if config.allow_pickle else True,  # never unpickle weights unless asked
        weights_only=True,  # and even then: tensors only, never code
        **_source_kwargs(config),
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(config.name_or_path, **kwargs)
    except (OSError, ValueError, ImportError, pickle.UnpicklingError, RuntimeError, SafetensorError) as err:
        # RuntimeError: a bad zip, or tensors whose shapes do not fit config.json; SafetensorError: a corrupt file
        folder = Path(config.name_or_path)
        pickled = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        if pickled and not list(folder.glob("*.safetensors")) and not config.allow_pickle:
            raise SftError(
                f"model.name_or_path={config.name_or_path!r}: holds only pickle weights ({', '.join(pickled)}), which "
                "are not loaded because unpickling can run arbitrary code; expected *.safetensors - convert them "
                "where you trust the file, or set model.allow_pickle: true to read them with torch's weights_only "
                "unpickler (tensors only)"
            ) from None
        if pickled and config.allow_pickle and ("Weights only" in str(err) or isinstance(err, pickle.UnpicklingError)):
            raise SftError(
                f"model.name_or_path={config.name_or_path!r}: {', '.join(pickled)} refused by torch's weights_only "
                "unpickler: the file holds objects other than tensors (possibly code), so it was not loaded"
            ) from None
        unreadable = _unreadable_safetensors(folder) if isinstance(err, SafetensorError) else None
        if unreadable:
            raise SftError(
                f"model.name_or_path={config.name_or_path!r}: {unreadable}; {EXPECTED['model weights']} - the file "
                "may be truncated or corrupt: copy or download it again"
            ) from None
        mismatch = _shape_mismatch(config) if "mismatched" in str(err) else None
        if mismatch:
            raise SftError(
                f"model.name_or_path={config.name_or_path!r}: the weights do not fit config.json: {mismatch}; "
                "expected the config.json the weights were saved with"
            ) from None
        what = "model weights (safetensors" + (" or weights_only pickle)" if config.allow_pickle else ")")
        raise _load_error(config, what, err) from None
    set_attention(model, config.attn_implementation, repr(config.name_or_path))
    model.config.use_cache = False  # training; generation turns it back on
    if tokenizer is not None and rows_needed(tokenizer) > model.get_input_embeddings().num_embeddings:
        # Only upward, only when tokens were added; new rows start at the mean of the old ones.
        model.resize_token_embeddings(rows_needed(tokenizer), mean_resizing=True)
    return model


def _unreadable_safetensors(folder: Path) -> str | None:
    """The first *.safetensors file whose header does not read (transformers' error does not name the file)."""
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as weights:
                weights.keys()
        except Exception as err:  # SafetensorError, or an OSError for an unreadable file
            return f"{file.name} is not a readable safetensors file ({err})"
    return None


def _shape_mismatch(config: ModelConfig) -> str | None:
    """The first tensor whose shape in the checkpoint differs from the one config.json builds (transformers only
    logs these, in a report shown at warning verbosity); None if none is found."""
    folder = Path(config.name_or_path)
    try:
        with torch.device("meta"):  # shapes only: no memory
            model = AutoModelForCausalLM.from_config(load_model_config(config))
        built = {name: list(t.shape) for name, t in model.state_dict().items()}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as weights:
                for name in weights.keys():
                    shape = list(weights.get_slice(name).get_shape())
                    if name in built and built[name] != shape:
                        return f"{name} is {shape} in {file.name} but config.json makes it {built[name]}"
    except Exception:  # a best-effort detail for the message; the caller falls back to the library's error
        return None
    return None
