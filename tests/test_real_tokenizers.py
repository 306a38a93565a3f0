"""The real tokenizers beyond Qwen2.5 and GPT-2: Mistral and T5 SentencePiece, Phi-4 BPE, the tiny ones, a broken one.

Each is loaded the way a user's model folder is, through `sft.model.load_tokenizer`, from a folder built in tmp_path out
of the files in tests/fixtures plus a minimal tokenizer_config.json naming the tokenizer class. Each gets the template
its family really uses (Mistral: mistral-common's v1_spm.jinja; Phi-4: its own <|im_sep|> template, and TRL's
phi3.jinja), or the named "chatml" template for T5 and the tiny tokenizers, which have none. For every one,
`tokenize_examples` must train, per assistant turn, exactly the answer's ids as they sit in the rendering followed by
the end-of-turn id, and nothing else (counted with `check_row`).

SentencePiece `.model` files. transformers reads the piece list out of the model's protobuf (SentencePieceExtractor),
which needs the `sentencepiece` and `protobuf` packages; neither is installed in this project's environment. Tests
that load a `.model` therefore run twice: with those packages (skipped, saying so, when they are missing) and with
`read_spm_model` below, a 40-line reader of the same protobuf fields handed to transformers' own conversion in place
of the parse (everything after the parse is transformers' code). The reader is checked three ways: T5's spiece.model
read by it tokenizes exactly as the official t5-small tokenizer.json; Mistral's gives the ids SentencePiece itself
gives (public reference ids below); and, where sentencepiece is installed, it equals sentencepiece's own parse.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, T5Config
from transformers.convert_slow_tokenizer import SentencePieceExtractor

from sft.config import ModelConfig
from sft.data import Example
from sft.errors import SftError
from sft.model import check_vocab, load_tokenizer, rows_needed
from sft.tokenize import IGNORE, prompt_ids, render, tokenize_examples
from tests.conftest import shared
from tests.test_tokenize import check_row, decode, ids_of, spans

# ---------------------------------------------------------------------------------------------------------------
# SentencePiece .model files without the sentencepiece package


def _spm_missing() -> list[str]:
    missing = [] if find_spec("sentencepiece") else ["sentencepiece"]
    try:
        have_protobuf = find_spec("google.protobuf") is not None
    except ModuleNotFoundError:  # no "google" namespace at all
        have_protobuf = False
    return missing + ([] if have_protobuf else ["protobuf"])


SPM_MISSING = _spm_missing()
SPM_SKIP = (
    f"loading a SentencePiece .model through transformers needs the {' and '.join(SPM_MISSING)} package(s), not "
    "installed in this environment (pip install sentencepiece protobuf); the same checks run with read_spm_model"
)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        byte = buf[i]
        i += 1
        out |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return out, i


def _fields(buf: bytes):
    """(field number, value) of a protobuf message: ints for varints, bytes for the rest."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i : i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i : i + size], i + size
        else:
            raise ValueError(f"protobuf wire type {wire} is not used by sentencepiece_model.proto")
        yield key >> 3, value


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def read_spm_model(path) -> SimpleNamespace:
    """The fields of sentencepiece_model.proto that transformers reads, with the proto's defaults."""
    pieces = []
    trainer = SimpleNamespace(
        model_type=1, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=False, unk_piece="<unk>",
        bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
    )  # fmt: skip
    normalizer = SimpleNamespace(
        name="", precompiled_charsmap=b"", add_dummy_prefix=True, remove_extra_whitespaces=True, escape_whitespaces=True
    )
    trainer_fields = {3: "model_type", 35: "byte_fallback", 40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}
    trainer_fields |= {45: "unk_piece", 46: "bos_piece", 47: "eos_piece", 48: "pad_piece"}
    normalizer_fields = {1: "name", 2: "precompiled_charsmap", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces"}
    normalizer_fields |= {5: "escape_whitespaces"}
    for number, value in _fields(path.read_bytes()):
        if number == 1:  # repeated SentencePiece {piece = 1; score = 2; type = 3 [default NORMAL]}
            piece = SimpleNamespace(piece="", score=0.0, type=1)
            for n, v in _fields(value):
                if n == 1:
                    piece.piece = v.decode("utf-8")
                elif n == 2:
                    piece.score = struct.unpack("<f", v)[0]
                elif n == 3:
                    piece.type = v
            pieces.append(piece)
        for spec, known, target in ((2, trainer_fields, trainer), (3, normalizer_fields, normalizer)):
            if number != spec:
                continue
            for n, v in _fields(value):
                if n in known:
                    default = getattr(target, known[n])
                    if isinstance(default, bool):
                        v = bool(v)
                    elif isinstance(default, str):
                        v = v.decode("utf-8")
                    elif isinstance(default, int):
                        v = _signed(v)
                    setattr(target, known[n], v)
    return SimpleNamespace(pieces=pieces, trainer_spec=trainer, normalizer_spec=normalizer)


def _read_into_extractor(self, model) -> None:
    self.proto = read_spm_model(Path(model))


@contextmanager
def spm_backend(backend: str | None):
    """None: no .model involved. "sentencepiece": transformers as it is. "reader": read_spm_model parses the proto."""
    if backend == "sentencepiece" and SPM_MISSING:
        pytest.skip(SPM_SKIP)
    if backend != "reader":
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SentencePieceExtractor, "__init__", _read_into_extractor)
        yield


SPM_BACKENDS = ["reader", "sentencepiece"]

# ---------------------------------------------------------------------------------------------------------------
# Model folders in tmp_path, built from the fixtures

# microsoft/phi-4's chat template (tokenizer_config.json), verbatim: no newline between turns, <|im_end|> closes them.
PHI4_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant"
    "<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)
PHI3_TEMPLATE = "chat_templates/trl/phi3.jinja"
PHI3_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def _config(folder, **entries) -> None:
    (folder / "tokenizer_config.json").write_text(json.dumps(entries), encoding="utf-8")


def _mistral(folder) -> None:
    shutil.copy(shared("tokenizers/mistral_spm/tokenizer.model.v1"), folder / "tokenizer.model")
    _config(
        folder, tokenizer_class="LlamaTokenizer", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        add_bos_token=True, add_eos_token=False,
    )  # fmt: skip


def _t5(folder) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(shared(f"tokenizers/t5_spm/{name}"), folder / name)


def _t5_spiece(folder) -> None:
    shutil.copy(shared("tokenizers/t5_spm/spiece.model"), folder / "spiece.model")
    shutil.copy(shared("tokenizers/t5_spm/tokenizer_config.json"), folder / "tokenizer_config.json")


def _phi4_merges(vocab: dict) -> str:
    """The fixture's vocab.json is torchtune's trimmed copy (63668 of Phi-4's 100352 ids); 36936 of its 100000
    merges build tokens it lacks, which the tokenizers library refuses. Keep the merges whose parts and result are in
    the vocabulary: every kept id is Phi-4's own."""
    lines = shared("tokenizers/phi4_tiktoken_bpe/merges.txt").read_text(encoding="utf-8").split("\n")
    kept = [lines[0]]
    for line in lines[1:]:
        if line:
            left, right = line.split(" ")
            if left in vocab and right in vocab and left + right in vocab:
                kept.append(line)
    return "\n".join(kept) + "\n"


def _phi4(folder, raw: bool = False, phi3_tokens: bool = False) -> None:
    source = shared("tokenizers/phi4_tiktoken_bpe")
    shutil.copy(source / "vocab.json", folder / "vocab.json")
    vocab = json.loads((source / "vocab.json").read_text(encoding="utf-8"))
    if raw:
        shutil.copy(source / "merges.txt", folder / "merges.txt")
    else:
        (folder / "merges.txt").write_text(_phi4_merges(vocab), encoding="utf-8")
    special = {"special": True, "normalized": False, "lstrip": False, "rstrip": False, "single_word": False}
    # As microsoft/phi-4 declares them: every id from 100256 up is a special added token.
    added = {str(i): {"content": token, **special} for token, i in vocab.items() if i >= 100256}
    entries = dict(tokenizer_class="GPT2Tokenizer", bos_token="<|endoftext|>", eos_token="<|im_end|>")
    entries |= dict(unk_token="<|endoftext|>", pad_token="<|dummy_85|>", added_tokens_decoder=added)
    if phi3_tokens:  # Phi-3's turn tokens, declared as Phi-3's tokenizer does; EOS is what Phi-3 appends at the end
        entries |= dict(eos_token="<|endoftext|>", additional_special_tokens=PHI3_TOKENS)
    _config(folder, **entries)
    (folder / "phi4.jinja").write_text(PHI4_TEMPLATE, encoding="utf-8")


def _tiny_bpe(folder) -> None:
    shutil.copy(shared("tokenizers/tiny_spm/tiny_bpe_tokenizer.json"), folder / "tokenizer.json")
    _config(folder, tokenizer_class="PreTrainedTokenizerFast")


def _tiny_spm(folder) -> None:
    shutil.copy(shared("tokenizers/tiny_spm/m.model"), folder / "tokenizer.model")
    _config(folder, tokenizer_class="PreTrainedTokenizerFast")


def _legacy_llama2(folder) -> None:
    shutil.copy(shared("negative/llama2_legacy_tokenizer.json"), folder / "tokenizer.json")
    _config(folder, tokenizer_class="LlamaTokenizer")


FOLDERS = {
    "mistral": _mistral,
    "t5": _t5,
    "t5_spiece": _t5_spiece,
    "phi4": _phi4,
    "phi4_raw": lambda folder: _phi4(folder, raw=True),
    "phi4_phi3": lambda folder: _phi4(folder, phi3_tokens=True),
    "tiny_bpe": _tiny_bpe,
    "tiny_spm": _tiny_spm,
    "legacy_llama2": _legacy_llama2,
}


@dataclass(frozen=True)
class Case:
    folder: str
    template: str  # "chatml", "phi4" (the folder's phi4.jinja) or a template file under tests/fixtures
    eot: str  # the token that closes an assistant turn
    length: int  # len(tokenizer) once loaded (chatml tokens included)
    bos_written: bool  # the template writes BOS (exactly once)
    grown: int  # trailing ids that are chatml tokens: their embedding rows may be missing (they grow)
    spm: bool  # a SentencePiece .model is converted at load
    rich: bool  # any text round-trips (byte-level or byte fallback); otherwise plain ASCII words only
    config: type  # the family's model config class, for check_vocab


CASES = {
    "mistral-v1_spm": Case(
        "mistral", "chat_templates/mistral_common/v1_spm.jinja", "</s>", 32000, True, 0, True, True, MistralConfig
    ),
    "t5-chatml": Case("t5", "chatml", "<|im_end|>", 32102, False, 2, False, False, T5Config),
    "phi4-phi4": Case("phi4", "phi4", "<|im_end|>", 63668, False, 0, False, True, Phi3Config),
    "phi4-phi3": Case(
        "phi4_phi3", "chat_templates/trl/phi3.jinja", "<|end|>", 63672, False, 0, False, True, Phi3Config
    ),
    "tiny_bpe-chatml": Case("tiny_bpe", "chatml", "<|im_end|>", 2003, False, 2, False, False, Qwen2Config),
    "tiny_spm-chatml": Case("tiny_spm", "chatml", "<|im_end|>", 2002, False, 2, True, False, LlamaConfig),
}
PARAMS = [
    pytest.param(name, backend, id=f"{name}[{backend}]" if backend else name)
    for name, case in CASES.items()
    for backend in (SPM_BACKENDS if case.spm else [None])
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    built = {}

    def build(name: str):
        if name not in built:
            path = tmp_path_factory.mktemp(name)
            FOLDERS[name](path)
            built[name] = path
        return built[name]

    return build


@pytest.fixture(scope="module")
def load(folder):
    """load(name, backend, template=None): the tokenizer as `sft` loads it; cached, never modified by the tests."""
    cache = {}

    def get(name: str, backend: str | None = None, template: str | None = None):
        case = CASES.get(name)
        path = folder(case.folder if case else name)
        if case and template is None:
            template = case.template
        if template == "phi4":
            template = str(path / "phi4.jinja")
        elif template not in (None, "chatml"):
            template = str(shared(template))
        key = (name, backend, template)
        if key not in cache:
            with spm_backend(backend):
                cache[key] = load_tokenizer(ModelConfig(name_or_path=str(path), chat_template=template))
        return cache[key]

    return get


# ---------------------------------------------------------------------------------------------------------------
# Conversations

# Plain words every tokenizer here spells back exactly (the tiny SentencePiece model has no Q, V, X, Z nor most
# digits; T5 has no newline; the tiny BPE drops every non-ASCII byte: it has no unknown token).
PLAIN = [
    ("What colour is the sky?", "The sky is blue."),
    ("Name a city in France.", "Paris is a city in France."),
    ("And one in Italy?", "Rome, of course."),
    ("Which is older?", "Rome is older than Paris."),
]
RICH = [
    ("What is 2+2?", "2 + 2 = 4."),
    ("Show a list.", "Line one.\nLine two: `x = [1, 2]` {ok}"),
    ("Say something in other scripts.", "Café, 東京, Привет and 😀: done!"),
    ("Punctuation first?", "(yes) - and it still works..."),
]


def chat(turns: list[tuple[str, str]], system: str | None = None, where: str = "test row 1") -> Example:
    messages = [{"role": "system", "content": system}] if system is not None else []
    for question, answer in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return Example(kind="chat", where=where, messages=messages)


def answers(example: Example) -> list[str]:
    return [m["content"] for m in example.messages if m["role"] == "assistant"]


def examples_for(case: Case) -> list[Example]:
    pool = PLAIN + (RICH if case.rich else [])
    return [
        chat(pool[:1]),  # single turn, no system
        chat(pool[1:4], system="You are terse."),  # three turns with a system prompt
        chat(pool, system="Answer briefly.") if case.rich else chat(pool[::-1]),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Every tokenizer and its template: the answers and their end-of-turn token, nothing else


@pytest.mark.parametrize(("name", "backend"), PARAMS)
def test_fixture_is_what_the_tests_assume(load, name, backend):
    case = CASES[name]
    tokenizer = load(name, backend)
    assert len(tokenizer) == case.length
    eot = tokenizer.convert_tokens_to_ids(case.eot)
    assert eot not in (None, tokenizer.unk_token_id) and decode(tokenizer, [eot]) == case.eot
    if name.startswith("phi4"):  # the trimmed vocabulary has holes: ids run to 100351 (see test_phi4_* below)
        assert max(tokenizer.get_vocab().values()) == 100351
    else:  # dense: every id below len(tokenizer) is a token
        assert max(tokenizer.get_vocab().values()) == len(tokenizer) - 1


@pytest.mark.parametrize(("name", "backend"), PARAMS)
def test_single_and_multi_turn_train_each_answer_and_its_end_of_turn(load, name, backend):
    case = CASES[name]
    tokenizer = load(name, backend)
    eot = tokenizer.convert_tokens_to_ids(case.eot)
    examples = examples_for(case)
    result = tokenize_examples(examples, tokenizer, max_length=4096)
    assert len(result.rows) == len(examples)
    assert result.end_tokens == {eot}
    for example, row in zip(examples, result.rows):
        ids = row["input_ids"]
        assert ids == ids_of(tokenizer, render(tokenizer, example.messages))  # no special token added twice
        texts = answers(example)
        found = check_row(tokenizer, row, texts, [[eot]] * len(texts))  # counted: one span per assistant turn
        assert len(found) == len(texts) and all(ids[end - 1] == eot for _, end in found)
        bos = tokenizer.bos_token_id
        if case.bos_written:
            assert ids[0] == bos and ids.count(bos) == 1
        elif bos is not None:  # Phi-4's BOS is also its EOS, which phi3.jinja writes at the very end
            assert bos not in ids[:-1]
        prompt = prompt_ids(tokenizer, example)  # the round trip: what the model is given at inference
        assert ids[: len(prompt)] == prompt and len(prompt) == found[-1][0]
    assert result.stats.trained_tokens == sum(
        len(ids_of(tokenizer, a)) + 1 for example in examples for a in answers(example)
    )


@pytest.mark.parametrize(("name", "backend"), PARAMS)
def test_check_vocab_wants_a_row_for_every_token_but_grown_chatml_ones(load, name, backend):
    case = CASES[name]
    tokenizer = load(name, backend)
    rows = rows_needed(tokenizer)  # the largest id + 1 (more than len() for Phi-4's trimmed vocabulary)
    check_vocab(tokenizer, case.config(vocab_size=rows))
    for fewer in range(1, case.grown + 1):  # chatml tokens past the rows: the embeddings grow to fit them
        assert tokenizer.convert_ids_to_tokens(rows - fewer) in ("<|im_start|>", "<|im_end|>")
        check_vocab(tokenizer, case.config(vocab_size=rows - fewer))
    short = rows - case.grown - 1
    with pytest.raises(SftError, match=f"ids run to {rows - 1} but the model has {short} embedding rows"):
        check_vocab(tokenizer, case.config(vocab_size=short))


def test_t5_and_tiny_get_the_chatml_tokens_and_the_others_get_none(load):
    """chatml adds its two tokens where they are missing (T5, tiny SentencePiece) and reuses them where the tokenizer
    has them already (the tiny BPE, a Qwen2-style vocabulary: ids 2001 and 2002)."""
    plain = load("t5")
    with_chatml = load("t5-chatml")
    assert len(with_chatml) == len(plain) + 2 == 32102
    assert with_chatml.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [32100, 32101]
    assert load("tiny_bpe-chatml").convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [2001, 2002]
    assert load("tiny_spm-chatml", "reader").convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [2000, 2001]


# ---------------------------------------------------------------------------------------------------------------
# Mistral (SentencePiece, byte fallback, BOS written by the template)

# The ids SentencePiece itself gives for this conversation with Mistral's 32000-piece model (shared by Mistral-7B and
# Mixtral-8x7B v0.1): the reference a public test of mistral-common style encoding checks HF against.
MISTRAL_REFERENCE = (
    [
        {"role": "user", "content": "2+2"},
        {"role": "assistant", "content": "4!"},
        {"role": "user", "content": "+2"},
        {"role": "assistant", "content": "6!"},
        {"role": "user", "content": "+4"},
    ],
    [1, 733, 16289, 28793, 28705, 28750, 28806, 28750, 733, 28748, 16289, 28793, 28705, 28781, 28808, 2, 733, 16289]
    + [28793, 648, 28750, 733, 28748, 16289, 28793, 28705, 28784, 28808, 2, 733, 16289, 28793, 648, 28781, 733, 28748]
    + [16289, 28793],
)
MISTRAL_SPM = "chat_templates/mistral_common/v1_spm.jinja"
MISTRAL_V1 = "chat_templates/mistral_common/v1.jinja"


@pytest.mark.parametrize("backend", SPM_BACKENDS)
def test_mistral_ids_are_sentencepieces_own(load, backend):
    tokenizer = load("mistral-v1_spm", backend)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert tokenizer("Hello world")["input_ids"] == [1, 22557, 1526]  # BOS, "▁Hello", "▁world"
    messages, expected = MISTRAL_REFERENCE
    assert ids_of(tokenizer, render(tokenizer, messages, generation_prompt=True)) == expected


@pytest.mark.parametrize("backend", SPM_BACKENDS)
def test_mistral_rows_equal_mistral_common_encoding(load, backend):
    """mistral-common encodes a v1 conversation as BOS, then per turn sp("[INST] question [/INST]"), sp(answer), EOS,
    each piece with SentencePiece's dummy prefix: the row must be exactly that, and the labels sp(answer) + EOS."""
    tokenizer = load("mistral-v1_spm", backend)
    example = chat(PLAIN[1:4] + RICH, system="You are terse.")
    row = tokenize_examples([example], tokenizer, 4096).rows[0]
    expected, labels = [1], [IGNORE]
    for i, (question, answer) in enumerate(PLAIN[1:4] + RICH):
        system = "You are terse.\n\n" if i == 0 else ""  # v1 puts the system prompt in the first user turn
        prompt = ids_of(tokenizer, f"[INST] {system}{question} [/INST]")
        answer_ids = ids_of(tokenizer, answer) + [2]
        expected += prompt + answer_ids
        labels += [IGNORE] * len(prompt) + answer_ids
    assert row["input_ids"] == expected
    assert row["labels"] == labels


@pytest.mark.parametrize("backend", SPM_BACKENDS)
@pytest.mark.parametrize("answer", [" 4", "  indented", " \tx"])
def test_mistral_answer_with_leading_space_merges_with_the_template_space(load, backend, answer):
    """v1_spm writes " " between [/INST] and the answer; SentencePiece joins it with the answer's own leading spaces
    ("▁▁"). The round trip still holds (the prompt ends at "]"), and what is trained is the rendering's own tokens
    after the prompt: the answer, spaces included, and </s>."""
    tokenizer = load("mistral-v1_spm", backend)
    example = chat([("Q?", answer), ("R?", answer)])
    row = tokenize_examples([example], tokenizer, 4096).rows[0]
    ids, found = row["input_ids"], spans(row["labels"])
    assert len(found) == 2
    for start, end in found:
        assert decode(tokenizer, ids[start:end]) == answer + "</s>"
        assert tokenizer.convert_ids_to_tokens(ids[start])[:2] == "▁▁"  # the template's space fused into the answer
        assert tokenizer.convert_ids_to_tokens(ids[start - 1]) == "]"


@pytest.mark.parametrize("backend", SPM_BACKENDS)
def test_mistral_v1_template_word_answers_train_the_glued_tokens(load, backend):
    """mistral-common's v1.jinja (written for its non-SentencePiece tokenizers) glues the answer to "[/INST]": with
    SentencePiece the answer then has no dummy prefix ("It", not "▁It"); trained are those tokens and </s>."""
    tokenizer = load("mistral-v1_spm", backend, template=MISTRAL_V1)
    example = chat(PLAIN[:3])
    row = tokenize_examples([example], tokenizer, 4096).rows[0]
    inst = ids_of(tokenizer, "[/INST]")
    glued = []
    for text in answers(example):
        joined = ids_of(tokenizer, "[/INST]" + text)
        assert joined[: len(inst)] == inst
        glued.append(joined[len(inst) :] + [2])
    ids = row["input_ids"]
    assert [ids[s:e] for s, e in spans(row["labels"])] == glued
    assert ids[0] == 1 and ids.count(1) == 1


@pytest.mark.parametrize("backend", SPM_BACKENDS)
@pytest.mark.parametrize(("answer", "piece"), [(".", "]."), (", ok", "],"), (")", "])"), ("] ok", "]]")])
def test_mistral_v1_template_answer_merging_with_inst_is_a_clear_round_trip_error(load, backend, answer, piece):
    """With v1.jinja an answer opening with ".", ",", ")" or "]" is glued to "[/INST]" and SentencePiece merges the two
    ("]." is one piece): the inference prompt ends with "]" but training has "].", so the model would learn a
    rendering it never sees. A genuine mismatch of that template with this tokenizer (v1_spm.jinja, which puts a
    space there, has none): the run stops saying where."""
    tokenizer = load("mistral-v1_spm", backend, template=MISTRAL_V1)
    assert piece in tokenizer.get_vocab()
    with pytest.raises(SftError) as err:
        tokenize_examples([chat([("Q?", answer), ("R?", "fine")], where="data.jsonl line 7")], tokenizer, 4096)
    message = str(err.value)
    assert message.startswith("data.jsonl line 7: round-trip check failed at assistant turn 1")
    assert "inference ']' vs training '" + piece in message


@pytest.mark.parametrize("backend", SPM_BACKENDS)
def test_mistral_completion_and_text_have_one_bos_and_train_eos(load, backend):
    tokenizer = load("mistral-v1_spm", backend)
    completion = Example(kind="completion", where="row 1", prompt="Translate: cat", completion="Katze")
    text = Example(kind="text", where="row 2", text="Hello world")
    first, second = tokenize_examples([completion, text], tokenizer, 4096).rows
    prompt, answer = ids_of(tokenizer, "Translate: cat"), ids_of(tokenizer, "Katze") + [2]
    assert first["input_ids"] == [1] + prompt + answer
    assert first["labels"] == [IGNORE] * (1 + len(prompt)) + answer
    assert second["input_ids"] == second["labels"] == [1, 22557, 1526, 2]


# Words, digits, punctuation, spaces and newlines inside, other scripts; an answer opens with a non-space (see above).
SPM_TEXT = st.text(st.characters(categories=("L", "N", "P", "S", "Zs"), exclude_characters="<>"), min_size=1)
SPM_ANSWER = st.text(
    st.characters(categories=("L", "N", "P", "S", "Zs"), include_characters="\n", exclude_characters="<>"),
    min_size=1,
    max_size=30,
).filter(lambda a: not a[0].isspace() and unicodedata.normalize("NFC", a) == a)


@st.composite
def mistral_conversations(draw):
    turns = [(draw(SPM_TEXT.filter(lambda t: len(t) < 30)), draw(SPM_ANSWER)) for _ in range(draw(st.integers(1, 3)))]
    return chat(turns, system=draw(st.one_of(st.none(), SPM_TEXT.filter(lambda t: len(t) < 20))))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(example=mistral_conversations())
def test_property_mistral_random_conversations_train_exactly_the_answers(load, example):
    tokenizer = load("mistral-v1_spm", "reader")
    result = tokenize_examples([example], tokenizer, max_length=100_000)
    texts = answers(example)
    check_row(tokenizer, result.rows[0], texts, [[2]] * len(texts))
    assert result.rows[0]["input_ids"].count(1) == 1


# ---------------------------------------------------------------------------------------------------------------
# T5 (SentencePiece unigram, no BOS, EOS appended by its post-processor)


def test_t5_has_no_bos_and_no_chat_template(load):
    tokenizer = load("t5")
    assert tokenizer.bos_token_id is None and tokenizer.eos_token_id == 1
    assert tokenizer("Hello world")["input_ids"] == [8774, 296, 1]  # "▁Hello", "▁world", </s> appended
    assert tokenizer.chat_template is None
    with pytest.raises(SftError, match="the tokenizer has no chat template but the data is conversational"):
        tokenize_examples([chat(PLAIN[:1])], tokenizer, 4096)


def test_t5_chatml_rows_hold_no_bos_and_no_appended_eos(load):
    tokenizer = load("t5-chatml")
    row = tokenize_examples([chat(PLAIN[:2], system="Be brief.")], tokenizer, 4096).rows[0]
    assert row["input_ids"][0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.eos_token_id not in row["input_ids"]  # the post-processor's </s> is not added to chat rows


def test_t5_completion_and_text_have_one_eos_at_the_end(load):
    tokenizer = load("t5")
    completion = Example(kind="completion", where="row 1", prompt="Translate: cat", completion="Katze")
    text = Example(kind="text", where="row 2", text="Hello world")
    first, second = tokenize_examples([completion, text], tokenizer, 4096).rows
    assert second["input_ids"] == [8774, 296, 1]
    assert first["input_ids"] == ids_of(tokenizer, "Translate: cat") + ids_of(tokenizer, "Katze") + [1]


def test_spm_reader_converts_t5_exactly_like_its_official_tokenizer_json(load):
    """T5's spiece.model, read by read_spm_model and converted by transformers, tokenizes adversarial strings and
    real answers exactly as t5-small's tokenizer.json: the reader gives transformers what sentencepiece would."""
    official = load("t5")
    converted = load("t5_spiece", "reader")
    assert type(converted).__name__ == "T5Tokenizer" and converted.get_vocab() == official.get_vocab()
    texts = json.loads(shared("encodings/blns.json").read_text(encoding="utf-8"))
    rows = json.loads(shared("datasets/llamafactory/alpaca_en_demo.json").read_text(encoding="utf-8"))
    texts += [row["output"] for row in rows[:100]]
    assert [converted(t)["input_ids"] for t in texts] == [official(t)["input_ids"] for t in texts]


@pytest.mark.skipif(bool(SPM_MISSING), reason=SPM_SKIP)
@pytest.mark.parametrize(
    "path",
    ["tokenizers/mistral_spm/tokenizer.model.v1", "tokenizers/t5_spm/spiece.model", "tokenizers/tiny_spm/m.model"],
)
def test_spm_reader_equals_sentencepieces_own_parse(path):
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(shared(path).read_bytes())
    mine = read_spm_model(shared(path))
    assert [(p.piece, p.score, p.type) for p in mine.pieces] == [(p.piece, p.score, p.type) for p in proto.pieces]
    for spec in ("trainer_spec", "normalizer_spec"):
        for key, value in vars(getattr(mine, spec)).items():
            assert getattr(getattr(proto, spec), key) == value, (spec, key)


# ---------------------------------------------------------------------------------------------------------------
# Phi-4 (byte-level BPE, cl100k-derived; the fixture's vocabulary is trimmed and has holes)


def test_phi4_ids_are_phi4s(load):
    tokenizer = load("phi4-phi4")
    assert tokenizer("Hello world")["input_ids"] == [9906, 1917]  # cl100k ids; Phi-4 adds no BOS
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|im_sep|>"]) == [100264, 100265, 100266]
    phi3 = load("phi4-phi3")
    assert phi3.convert_tokens_to_ids(PHI3_TOKENS) == [63668, 63669, 63670, 63671]  # added in the vocabulary's holes


def test_phi3_template_closing_eos_is_not_trained(load):
    """phi3.jinja ends a conversation with EOS after the last <|end|>\\n: decoration, not something to learn."""
    tokenizer = load("phi4-phi3")
    row = tokenize_examples([chat(PLAIN[:2])], tokenizer, 4096).rows[0]
    end, newline = tokenizer.convert_tokens_to_ids("<|end|>"), ids_of(tokenizer, "\n")
    assert row["input_ids"][-3:] == [end, *newline, tokenizer.eos_token_id]
    assert row["labels"][-3:] == [end, IGNORE, IGNORE]


def test_phi4_untrimmed_merges_are_a_clear_load_error(folder):
    path = folder("phi4_raw")
    with pytest.raises(SftError) as err:
        load_tokenizer(ModelConfig(name_or_path=str(path)))
    message = str(err.value)
    assert message.startswith(f"model.name_or_path={str(path)!r}: could not load the tokenizer")
    assert "IsRequired" in message  # the first merge result the trimmed vocabulary lacks
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_phi4_check_vocab_counts_the_largest_id_not_the_number_of_tokens(load):
    tokenizer = load("phi4-phi4")
    row = tokenize_examples([chat(PLAIN[:1])], tokenizer, 4096).rows[0]
    assert max(row["input_ids"]) >= 100265 > len(tokenizer) == 63668  # would index past a 63668-row embedding
    check_vocab(tokenizer, Phi3Config(vocab_size=100352))  # Phi-4's own: fine
    for rows in (100351, len(tokenizer)):
        with pytest.raises(SftError, match="embedding rows"):
            check_vocab(tokenizer, Phi3Config(vocab_size=rows))


# ---------------------------------------------------------------------------------------------------------------
# The tiny tokenizers


def test_tiny_bpe_loads_as_the_tokenizers_library_reads_it(load):
    tokenizer = load("tiny_bpe-chatml")
    raw = Tokenizer.from_file(str(shared("tokenizers/tiny_spm/tiny_bpe_tokenizer.json")))
    texts = [q + " " + a for q, a in PLAIN + RICH]
    assert [ids_of(tokenizer, t) for t in texts] == [raw.encode(t, add_special_tokens=False).ids for t in texts]
    assert tokenizer.bos_token_id is None and tokenizer.eos_token_id is None


def test_tiny_spm_model_is_a_unigram_model(load):
    """SOURCES.md calls m.model a SentencePiece BPE model; its proto says unigram (model_type 1), and it is converted
    as one. Its 2000 pieces lack most digits, so "4" is <unk>: the tests above give it plain words."""
    assert read_spm_model(shared("tokenizers/tiny_spm/m.model")).trainer_spec.model_type == 1
    tokenizer = load("tiny_spm-chatml", "reader")
    assert type(tokenizer.backend_tokenizer.model).__name__ == "Unigram"
    assert ids_of(tokenizer, "4") == [12, tokenizer.unk_token_id]  # "▁", <unk>


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers that do not load: a clear SftError naming the folder, never a raw exception


def test_legacy_llama2_tokenizer_is_a_clear_error_naming_the_folder(folder):
    path = folder("legacy_llama2")
    with pytest.raises(SftError) as err:
        load_tokenizer(ModelConfig(name_or_path=str(path)))
    assert type(err.value) is SftError
    message = str(err.value)
    assert message.startswith(f"model.name_or_path={str(path)!r}: could not load the tokenizer")
    assert "the folder exists but its files did not load" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__  # raised `from None`: no raw traceback


@pytest.mark.skipif(not SPM_MISSING, reason="sentencepiece and protobuf are installed: the .model loads")
def test_spm_model_without_sentencepiece_is_a_clear_error_naming_the_folder(folder):
    path = folder("mistral")
    with pytest.raises(SftError) as err:
        load_tokenizer(ModelConfig(name_or_path=str(path)))
    assert str(err.value).startswith(f"model.name_or_path={str(path)!r}: could not load the tokenizer")


@pytest.mark.skipif(not SPM_MISSING, reason="sentencepiece and protobuf are installed: the .model loads")
@pytest.mark.xfail(
    strict=True,
    reason="sft.model.load_tokenizer reports the last error transformers raised: after failing to read the .model "
    "without sentencepiece it falls back to tiktoken, so the message says 'tiktoken is required', not sentencepiece",
)
def test_spm_model_without_sentencepiece_says_which_package_is_missing(folder):
    with pytest.raises(SftError, match=re.escape("sentencepiece")):
        load_tokenizer(ModelConfig(name_or_path=str(folder("mistral"))))
