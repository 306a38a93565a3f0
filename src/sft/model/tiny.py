"""The offline stand-in: a tiny random Llama with a tokenizer learnt from the training data.

Nothing here is needed with a real model. It lets the whole pipeline run on a CPU with no network: the model is
built from a seed, so the same config always gives the same "pretrained" weights.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from sft.config import ModelConfig, TinyModelSpec
from sft.errors import SftError
from sft.model.templates import CHATML_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]
RECIPE = "sft_stand_in.json"


def stand_in_recipe(spec: TinyModelSpec, corpus: list[str]) -> dict:
    """What a stand-in model is built from: its spec and the text its tokenizer learnt."""
    digest = hashlib.sha256("\x00".join(corpus).encode()).hexdigest()[:16]
    return {"spec": spec.model_dump(), "corpus_sha256": digest}


def stand_in_config(spec: TinyModelSpec, vocab_size: int | None = None, **extra):
    """The LlamaConfig of a stand-in model. Before the tokenizer is learnt, the vocabulary is its bound."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size or spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,  # as Llama 3.2 1B: copying a prompt word out is then easy to learn
        initializer_range=spec.initializer_range,
        **extra,
    )


def build_tiny_model(spec: TinyModelSpec, path: Path, corpus: list[str]) -> None:
    """Write a random-weight Llama and a byte-level BPE tokenizer learnt from `corpus` to `path`, atomically."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    # SentencePiece-style BPE (as Llama 2 and Mistral): a word is the same token ("▁cat") wherever it stands,
    # after a space or at the start of a line, so the model does not have to learn two spellings of each word.
    bpe = Tokenizer(models.BPE(unk_token="<|unk|>"))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=["\n", "\t"] + [chr(c) for c in range(32, 127)],  # ASCII encodes; the rest is <|unk|>
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|unk|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=spec.max_position_embeddings,
    )

    config = stand_in_config(
        spec,
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "STAND_IN.md").write_text(
            "A tiny random-weight Llama built by `sft` from a seed, standing in for a real pretrained model so the "
            "pipeline runs offline. Its tokenizer was learnt from the training data.\n"
        )
        (tmp / RECIPE).write_text(json.dumps(stand_in_recipe(spec, corpus), indent=2) + "\n")
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_tiny_model(config: ModelConfig, corpus: list[str]) -> bool:
    """Build the stand-in model at `name_or_path` if the config asks for one and it is absent; True if built."""
    path = Path(config.name_or_path)
    if config.tiny is None:
        return False
    if path.exists():
        recipe = path / RECIPE
        if recipe.is_file() and json.loads(recipe.read_text()) != stand_in_recipe(config.tiny, corpus):
            raise SftError(
                f"model.name_or_path={config.name_or_path!r}: the stand-in model there was built from another "
                "model.tiny spec or other training data; delete that folder to rebuild it, or point name_or_path "
                "elsewhere"
            )
        return False
    build_tiny_model(config.tiny, path, corpus)
    return True
