"""Inference from an export: the adapter on its base (or a merged model), with the chat template saved with it."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from sft.config import ModelConfig
from sft.console import log
from sft.data.tokenize import render
from sft.errors import SftError
from sft.evaluate import decoding_config, generate
from sft.model import load_model, load_tokenizer, read_adapter_base


def resolve_export(path: Path) -> Path:
    """A run folder, an adapter folder or a merged-model folder -> the folder to load."""
    for candidate in (path / "adapter", path):
        if (candidate / "adapter_config.json").is_file() or (candidate / "config.json").is_file():
            return candidate
    if not path.exists():
        raise SftError(f"{path}: no such folder; expected a run folder (runs/NAME), its adapter/ or merged/ folder")
    raise SftError(f"{path}: holds no adapter_config.json or config.json; expected an export written by `sft train`")


def load_for_inference(path: Path):
    """(model, tokenizer, stop token ids) from an export folder."""
    from peft import PeftModel

    folder = resolve_export(path)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(folder)))
    meta_path = folder / "sft_export.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    except ValueError as err:  # not JSON or not UTF-8
        raise SftError(f"{meta_path}: not valid JSON ({err}); expected the file `sft train` wrote there") from None
    if (folder / "adapter_config.json").is_file():
        base_name = meta.get("base_model") or read_adapter_base(folder)
        settings = {k: meta[k] for k in ("revision", "dtype", "attn_implementation", "trust_remote_code") if k in meta}
        base = ModelConfig(name_or_path=base_name, **settings)
        try:
            model = PeftModel.from_pretrained(load_model(base, tokenizer), folder)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:  # missing, corrupt or misfit
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SftError(
                f"{folder}: the adapter did not load on {base_name} ({first}); expected adapter_config.json and a "
                "complete adapter_model.safetensors as `sft train` exported them, for this base model"
            ) from None
    else:
        model = load_model(ModelConfig(name_or_path=str(folder)))
    eos = model.generation_config.eos_token_id
    stop = set(meta.get("stop_token_ids") or ([eos] if isinstance(eos, int) else eos or []))
    stop |= {tokenizer.eos_token_id} - {None}
    return model, tokenizer, stop


def answer(model, tokenizer, stop: set[int], messages: list[dict], max_new_tokens: int) -> str:
    text = render(tokenizer, messages, generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return generate(model, tokenizer, [ids], max_new_tokens, batch_size=1, stop=stop)[0]


def chat_loop(path: Path, system: str | None, max_new_tokens: int) -> None:
    """`sft chat`: an interactive conversation in the terminal; answers stream as they are generated.

    /reset clears the conversation, /exit or Ctrl-D ends it; Ctrl-C stops an answer (that turn is dropped) and, at
    the prompt, ends the session. Prompts are shown only when stdin is a terminal, so piped input gives answers only.
    """
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())

    model, tokenizer, stop = load_for_inference(path)
    limit = getattr(model.config, "max_position_embeddings", None)
    log(f"chat with {resolve_export(path)}: /reset clears the conversation, /exit or Ctrl-D quits")
    prompt = "you> " if sys.stdin.isatty() else ""
    messages = _fresh(system)
    while True:
        try:
            line = input(prompt).strip()
        except (EOFError, KeyboardInterrupt):
            if prompt:
                print()
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            messages = _fresh(system)
            log("conversation cleared")
            continue
        messages.append({"role": "user", "content": line})
        ids = _fit(tokenizer, messages, system, limit, max_new_tokens)
        try:
            reply = _stream(model, tokenizer, stop, ids, max_new_tokens)
        except KeyboardInterrupt:
            messages.pop()
            print(file=sys.stderr)  # end the half-streamed answer's line
            log("answer stopped; that turn is not kept")
            continue
        messages.append({"role": "assistant", "content": reply})


def _fresh(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system else []


def _prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer(render(tokenizer, messages, generation_prompt=True), add_special_tokens=False)["input_ids"]


def _fit(tokenizer, messages: list[dict], system: str | None, limit: int | None, max_new_tokens: int) -> list[int]:
    """Prompt ids of the conversation; the oldest turns (never the system message) are dropped, in place, while the
    prompt and the answer would not fit the model's context."""
    ids = _prompt_ids(tokenizer, messages)
    first = 1 if system else 0
    dropped = False
    while limit and len(ids) + max_new_tokens > limit and len(messages) - first > 1:
        del messages[first : first + 2]  # a user turn and its answer
        dropped = True
        ids = _prompt_ids(tokenizer, messages)
    if dropped:
        log(f"oldest turns dropped to fit the model's {limit}-token context")
    return ids


@torch.no_grad()
def _stream(model, tokenizer, stop: set[int], ids: list[int], max_new_tokens: int) -> str:
    """Greedy answer to the prompt ids, printed to stdout token by token; returns the decoded answer."""
    from transformers import TextStreamer

    model.eval()
    device = next(model.parameters()).device
    greedy = decoding_config(tokenizer, stop, max_new_tokens)
    inputs = torch.tensor([ids], device=device)
    out = model.generate(
        input_ids=inputs,
        attention_mask=torch.ones_like(inputs),
        generation_config=greedy,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
    )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
