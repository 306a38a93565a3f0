"""`sft chat`: an interactive session on an export that streams answers and keeps the conversation.

Driven three ways: through a real terminal (tmux), through a pipe, and in-process with `input` replaced.
"""

from __future__ import annotations

import builtins
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from sft import generate as gen
from sft.config import validate_config
from sft.data import corpus, load_dataset
from sft.export import export
from sft.model import apply_lora, ensure_tiny_model, load_model, load_tokenizer
from tests.test_pipeline import tiny_config

ROOT = Path(__file__).resolve().parents[1]
FIRST, SECOND = "reverse: loud wants also wants", "reverse: warm hill happy warm"
MAX_NEW = 12


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny adapter export, loaded as `sft chat` loads it. Untrained: a few training steps teach the tiny model to
    answer nothing (it learns the end-of-turn token first), and empty answers would make the checks vacuous; the
    random model's answers are long and may hold newlines, so answers are compared with whitespace normalised."""
    tmp = tmp_path_factory.mktemp("chat")
    raw = tiny_config(tmp)  # the same tiny model and data as tests/test_pipeline.py
    raw.update(export={"merged": False}, output={"runs_dir": str(tmp / "runs"), "name": "t"})
    config = validate_config(raw)
    dataset = load_dataset(config.data)
    ensure_tiny_model(config.model, corpus(dataset))
    tokenizer = load_tokenizer(config.model)
    model = apply_lora(load_model(config.model), config.adapter)
    run_dir = tmp / "run"
    run_dir.mkdir()
    export(model, tokenizer, run_dir, config, {tokenizer.convert_tokens_to_ids("<|im_end|>")}, card={})
    model, tokenizer, stop = gen.load_for_inference(run_dir)

    def reply(*turns: str) -> str:
        """What chat answers to the last of `turns`, each earlier one answered as chat answered it."""
        messages: list[dict] = []
        for turn in turns:
            messages.append({"role": "user", "content": turn})
            messages.append({"role": "assistant", "content": gen.answer(model, tokenizer, stop, messages, MAX_NEW)})
        return messages[-1]["content"]

    assert all(reply(*turns).strip() for turns in ((FIRST,), (SECOND,), (FIRST, SECOND))), "empty answers"
    assert reply(SECOND) != reply(FIRST, SECOND), "the history must change the answer, or keeping it is not tested"
    return SimpleNamespace(dir=run_dir, tmp=tmp, model=model, tokenizer=tokenizer, stop=stop, reply=reply)


def flat(text: str) -> str:
    return " ".join(text.split())


def chat_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "sft", "chat", str(run_dir), "--max-new-tokens", str(MAX_NEW)]


# -- a real terminal -------------------------------------------------------------------------------------------------


class Tmux:
    """One tmux server of our own (its own socket), so nothing else on the machine is touched."""

    def __init__(self) -> None:
        self.socket = f"sft-chat-test-{uuid.uuid4().hex[:8]}"
        self.env = {**os.environ, "TERM": os.environ.get("TERM") or "xterm-256color"}

    def __call__(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, env=self.env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def start(self, name: str, command: str) -> None:
        self("new-session", "-d", "-s", name, "-x", "120", "-y", "40", command)

    def screen(self, name: str) -> list[str]:
        return [line.rstrip() for line in self("capture-pane", "-p", "-t", name).splitlines()]

    def wait_for(self, name: str, *parts: str, timeout: float = 60) -> list[str]:
        """Poll the pane until `parts` appear on it one after the other (whitespace normalised)."""
        expected = flat(" ".join(parts))
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen(name)
            if expected in flat(" ".join(screen)):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"waited {timeout:.0f}s for {expected!r}; the terminal shows:\n" + "\n".join(screen)
                )
            time.sleep(0.2)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, env=self.env)


@pytest.fixture
def tmux():
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed: the real-terminal test of `sft chat` needs it (apt-get install tmux)")
    server = Tmux()
    try:
        yield server
    finally:
        server.kill()


def shell_line(run_dir: Path) -> str:
    # After the session ends, show its exit status and keep the pane open long enough to read it.
    return f"cd {shlex.quote(str(ROOT))} && {shlex.join(chat_command(run_dir))}; echo CHAT-EXIT=$?; sleep 60"


def test_chat_in_a_real_terminal_streams_answers_and_keeps_the_conversation(run, tmux):
    first, second = run.reply(FIRST), run.reply(FIRST, SECOND)
    tmux.start("chat", shell_line(run.dir))
    screen = tmux.wait_for("chat", "you>")
    banner = "".join(screen[: screen.index("you>")])  # may wrap
    assert str(run.dir) in banner and "/reset" in banner and "/exit" in banner and "Ctrl-D" in banner, screen
    tmux("send-keys", "-t", "chat", FIRST, "Enter")
    tmux.wait_for("chat", f"you> {FIRST}", first, "you>")
    tmux("send-keys", "-t", "chat", SECOND, "Enter")  # answered with the first turn in its context
    tmux.wait_for("chat", f"you> {FIRST}", first, f"you> {SECOND}", second, "you>")
    tmux("send-keys", "-t", "chat", "/exit", "Enter")
    tmux.wait_for("chat", "you> /exit", "CHAT-EXIT=0")


def test_ctrl_d_and_ctrl_c_at_the_prompt_end_the_session_cleanly(run, tmux):
    for name, key in (("eof", "C-d"), ("interrupt", "C-c")):
        tmux.start(name, shell_line(run.dir))
        tmux.wait_for(name, "you>")
        tmux("send-keys", "-t", name, key)
        screen = tmux.wait_for(name, "you> CHAT-EXIT=0")
        assert not any("Traceback" in line or "interrupted" in line for line in screen), screen


# -- a pipe ----------------------------------------------------------------------------------------------------------


def test_piped_chat_prints_only_the_answers_and_reset_forgets(run):
    def chat(text: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            chat_command(run.dir), input=text, capture_output=True, text=True, cwd=run.tmp, timeout=120
        )

    kept = chat(f"{FIRST}\n\n{SECOND}\n")
    assert kept.returncode == 0, kept.stderr
    assert flat(kept.stdout) == flat(f"{run.reply(FIRST)} {run.reply(FIRST, SECOND)}")  # no prompts, no echo

    reset = chat(f"{FIRST}\n/reset\n{SECOND}\n")
    assert reset.returncode == 0, reset.stderr
    assert flat(reset.stdout) == flat(f"{run.reply(FIRST)} {run.reply(SECOND)}")  # the second as a new conversation
    assert "conversation cleared" in reset.stderr
    assert "Traceback" not in reset.stderr


# -- in process ------------------------------------------------------------------------------------------------------


def drive(monkeypatch, run, lines: list[str], stream=None, system: str | None = None) -> list[list[dict]]:
    """Run chat_loop on `lines` as typed input, the model's answer replaced by `stream(n)` (default "answer n");
    returns the conversation rendered for each answer."""
    typed = iter(lines)
    rendered: list[list[dict]] = []
    asked: list[list[dict]] = []
    real_prompt_ids = gen._prompt_ids

    def fake_input(prompt: str = "") -> str:
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    def recording_prompt_ids(tokenizer, messages):
        rendered.append([dict(m) for m in messages])
        return real_prompt_ids(tokenizer, messages)

    def fake_stream(model, tokenizer, stop, ids, max_new_tokens):
        asked.append(rendered[-1])
        return stream(len(asked)) if stream else f"answer {len(asked)}"

    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr(gen, "_prompt_ids", recording_prompt_ids)
    monkeypatch.setattr(gen, "_stream", fake_stream)
    monkeypatch.setattr(gen, "load_for_inference", lambda path: (run.model, run.tokenizer, run.stop))
    gen.chat_loop(run.dir, system, MAX_NEW)
    return asked


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_the_conversation_is_kept_and_reset(monkeypatch, run):
    asked = drive(monkeypatch, run, ["a", "", "  ", "b", "/reset", "c", "/exit", "never read"], system="Be brief.")
    system = {"role": "system", "content": "Be brief."}
    assert asked == [
        [system, user("a")],
        [system, user("a"), assistant("answer 1"), user("b")],
        [system, user("c")],
    ]


def test_ctrl_c_during_an_answer_drops_that_turn_and_keeps_the_session(monkeypatch, run, capsys):
    def stream(n: int) -> str:
        if n == 2:
            raise KeyboardInterrupt
        return f"answer {n}"

    asked = drive(monkeypatch, run, ["a", "b", "c"], stream=stream)
    assert asked[-1] == [user("a"), assistant("answer 1"), user("c")]
    assert "answer stopped" in capsys.readouterr().err


def test_old_turns_are_dropped_to_fit_the_context(run, capsys):
    messages = [{"role": "system", "content": "s"}]
    for n in range(40):
        messages += [user(f"{FIRST} {n}"), assistant(f"wants also wants loud {n}")]
    messages.append(user(SECOND))
    ids = gen._fit(run.tokenizer, messages, "s", 128, MAX_NEW)
    assert len(ids) + MAX_NEW <= 128
    assert messages[0]["role"] == "system" and messages[-1] == user(SECOND) and messages[1]["role"] == "user"
    assert len(messages) < 20
    assert "oldest turns dropped" in capsys.readouterr().err


def test_streamed_answer_is_printed_as_generated_and_returned(run, capsys):
    messages = [user(FIRST)]
    reply = gen._stream(run.model, run.tokenizer, run.stop, gen._prompt_ids(run.tokenizer, messages), MAX_NEW)
    assert reply == run.reply(FIRST)
    printed = capsys.readouterr().out
    assert printed.endswith("\n") and flat(printed) == flat(reply)
