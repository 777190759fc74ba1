"""Multi-turn chat: turns kept in the KV cache, context overflow, interruption, and chat/base.py end to end."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lit_gpt.load import load_model
from lit_gpt.generate import ChatSession, generate
from lit_gpt.prompts import get_style
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import UserError
from hf_checkpoints import lively_checkpoint

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 1024


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat") / "phi-2"  # named like the model, so the phi-2 style is picked
    lively_checkpoint(d, BLOCK)
    return d, Tokenizer(d)


@pytest.fixture(scope="module")
def fresh(ckpt):
    """A second model instance, to recompute replies from scratch without touching the session's cache."""
    return load_model(ckpt[0])


def expected_reply(fresh, tokenizer, session: ChatSession) -> str:
    """The latest reply, recomputed greedily by prefilling the whole conversation before it in one go."""
    prompt = torch.tensor(session.ids[:session.reply_start])
    budget = min(session.max_new_tokens, session.context - len(prompt))
    [c] = generate(fresh, tokenizer, prompt, len(prompt) + budget, temperature=0.0,
                   stop_sequences=session.style.stop_sequences)
    return c.text


def count_forward(model):
    """Record (tokens, first position) of every forward with a cache: the real loop, instrumented."""
    calls = []
    handle = model.register_forward_hook(lambda m, args, out: calls.append((args[0].size(1), int(args[1][0]))))
    return calls, handle


@pytest.mark.slow
def test_turns_prefill_only_their_own_tokens(ckpt, fresh):
    d, tokenizer = ckpt
    model = load_model(d)
    style = get_style("phi-2")
    session = ChatSession(model, tokenizer, style, max_new_tokens=24, temperature=0.0)
    calls, handle = count_forward(model)
    prompts = ["Hello there, how are you?", "What is 2+2?", "Tell me more about it."]
    for i, prompt in enumerate(prompts):
        history, cached = len(session.ids), session.cached
        turn = tokenizer.encode(style.next_turn(prompt) if i else style.apply(prompt)).tolist()
        calls.clear()
        reply = "".join(session.reply(prompt))
        (prefill, pos), decode = calls[0], calls[1:]
        # the prefill is this turn's tokens plus what the cache lacks: at most the last sampled reply token
        assert pos == cached and prefill == history - cached + len(turn)
        assert history - cached <= 1
        assert all(n == 1 for n, _ in decode)
        assert sum(n for n, _ in calls) == prefill + session.stats["tokens"] - 1
        if i:
            assert prefill < len(turn) + 2 < history
        assert reply and reply == expected_reply(fresh, tokenizer, session)
    handle.remove()
    assert [p for p, _ in session.turns] == prompts


def test_context_full_drops_oldest_turns(ckpt, fresh):
    d, tokenizer = ckpt
    model = load_model(d)
    model.set_kv_cache(1, max_seq_length=128)  # a small context, so that it fills after two turns
    notices = []
    session = ChatSession(model, tokenizer, get_style("phi-2"), max_new_tokens=40, temperature=0.0,
                          notify=notices.append)
    assert session.context == 128
    fresh.set_kv_cache(1, max_seq_length=128)
    for i in range(6):
        reply = "".join(session.reply(f"Question number {i}: what comes next in this story?"))
        assert len(session.ids) <= 128
        assert reply == expected_reply(fresh, tokenizer, session)
    assert any("dropped the oldest" in n for n in notices)
    assert 1 <= len(session.turns) < 6
    assert session.turns[-1][0].startswith("Question number 5")
    fresh.set_kv_cache(1)

    # a prompt that cannot fit at all: a clear error before anything changes, and the chat goes on
    before = (list(session.ids), session.cached, list(session.turns))
    with pytest.raises(UserError, match="the prompt is .* tokens but the context holds 128 tokens"):
        next(session.reply("word " * 200))
    assert (session.ids, session.cached, session.turns) == before
    assert "".join(session.reply("Short again."))


def test_interrupted_reply_keeps_the_cache_consistent(ckpt, fresh):
    d, tokenizer = ckpt
    model = load_model(d)
    session = ChatSession(model, tokenizer, get_style("phi-2"), max_new_tokens=60, temperature=0.0)
    "".join(session.reply("First question?"))

    # Ctrl-C inside the model's forward (between its blocks), in the middle of the second reply
    calls = []

    def interrupt(module, args, out):
        calls.append(1)
        if len(calls) == 15:
            raise KeyboardInterrupt

    handle = model.transformer.h[0].register_forward_hook(interrupt)  # mid-forward: block 0 wrote its cache
    shown = []
    with pytest.raises(KeyboardInterrupt):
        for chunk in session.reply("Second question?"):
            shown.append(chunk)
    handle.remove()
    assert session.turns[-1] == ("Second question?", "".join(shown))  # what was shown stays in the history
    assert "".join(session.reply("Third question?")) == expected_reply(fresh, tokenizer, session)

    # Ctrl-C while the reply is being printed: the front end closes the generator
    replies = session.reply("Fourth question?")
    shown = [next(replies) for _ in range(5)]
    replies.close()
    assert session.turns[-1] == ("Fourth question?", "".join(shown))
    assert "".join(session.reply("Fifth question?")) == expected_reply(fresh, tokenizer, session)

    # Ctrl-C during the prefill: nothing generated, the turn is kept with an empty reply
    calls.clear()
    handle = model.register_forward_hook(lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        next(session.reply("Sixth question?"))
    handle.remove()
    assert session.turns[-1] == ("Sixth question?", "")
    assert "".join(session.reply("Seventh question?")) == expected_reply(fresh, tokenizer, session)

    session.reset()
    assert session.ids == [] and session.cached == 0 and session.turns == []
    assert "".join(session.reply("Hello again.")) == expected_reply(fresh, tokenizer, session)


# --- chat/base.py as a subprocess ---

def chat_command(d: Path, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "chat" / "base.py"), "--checkpoint_dir", str(d), *args]


ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.mark.slow
def test_chat_script_three_turns(ckpt):
    d, tokenizer = ckpt
    prompts = ["Hello there, how are you?", "What is 2+2?", "Tell me more about it."]
    too_long = "word " * (BLOCK + 10)
    lines = [prompts[0], prompts[1], too_long, prompts[2], "/reset", prompts[0]]
    # fp32, not the CPU's default: the replies are compared with the in-process fp32 model
    r = subprocess.run(chat_command(d, "--temperature", "0", "--max_new_tokens", "20", "--precision", "32-true"),
                       input="\n".join(lines).encode() + b"\n", capture_output=True, timeout=120, env=ENV)
    out, err = r.stdout.decode("utf-8"), r.stderr.decode("utf-8")
    assert r.returncode == 0, err  # end of input exits cleanly
    assert "Traceback" not in err

    # the same conversation in-process gives the same replies
    session = ChatSession(load_model(d), tokenizer, get_style("phi-2"), max_new_tokens=20, temperature=0.0)
    replies = ["".join(session.reply(p)).lstrip() for p in prompts]
    session.reset()
    replies.append("".join(session.reply(prompts[0])).lstrip())
    assert replies[0] == replies[3]  # /reset: the first turn again, in a fresh conversation
    expected = (f">> Prompt: >> Reply: {replies[0]}\n>> Prompt: >> Reply: {replies[1]}\n>> Prompt: >> Reply: \n"
                f">> Prompt: >> Reply: {replies[2]}\n>> Prompt: >> Prompt: >> Reply: {replies[3]}\n>> Prompt: \n")
    assert out == expected
    assert f"[the prompt is {len(tokenizer.encode(get_style('phi-2').apply(too_long)))} tokens but the context " \
           f"holds {BLOCK} tokens including the reply; shorten it]" in err
    assert "[new conversation]" in err
    prefilled = [int(n) for n in re.findall(r"\((\d+) prefilled", err)]
    turn2 = len(tokenizer.encode(get_style("phi-2").next_turn(prompts[1])))
    assert len(prefilled) == 4
    assert prefilled[1] <= turn2 + 1  # the second turn did not process the first one again


class Reader:
    """Collects a pipe's bytes on a thread, so the test can wait for text without blocking."""

    def __init__(self, pipe) -> None:
        self.data = b""
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, args=(pipe,), daemon=True)
        self.thread.start()

    def _run(self, pipe) -> None:
        while chunk := os.read(pipe.fileno(), 4096):
            with self.lock:
                self.data += chunk

    def text(self) -> str:
        with self.lock:
            return self.data.decode("utf-8", errors="replace")

    def wait_for(self, predicate, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if predicate(text):
                return text
            time.sleep(0.02)
        raise AssertionError(f"timed out; got so far:\n{self.text()[-2000:]}")


@pytest.mark.slow
def test_sigint_during_reply_returns_to_the_prompt(ckpt):
    d, tokenizer = ckpt
    # raw style: only eos could end the reply early; greedy, this model does not produce it.
    # The precision is the default one (bf16 on a CPU that has it).
    proc = subprocess.Popen(chat_command(d, "--temperature", "0", "--max_new_tokens", "900", "--prompt_style", "raw"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    out, err = Reader(proc.stdout), Reader(proc.stderr)
    try:
        out.wait_for(lambda t: t.count(">> Prompt: ") == 1)
        proc.stdin.write(b"Tell me a very long story.\n")
        proc.stdin.flush()
        out.wait_for(lambda t: len(t.split(">> Reply: ", 1)[-1]) > 40 if ">> Reply: " in t else False)
        proc.send_signal(signal.SIGINT)
        err.wait_for(lambda t: "[reply interrupted]" in t)
        out.wait_for(lambda t: t.count(">> Prompt: ") == 2)
        assert proc.poll() is None  # still running: back at the prompt

        proc.stdin.write(b"And then?\n")
        proc.stdin.flush()
        stats = err.wait_for(lambda t: "Time for inference" in t, timeout=120)
        out.wait_for(lambda t: t.count(">> Prompt: ") == 3)
        proc.stdin.write(b"\n")  # an empty prompt exits
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.text()
    first = text.split(">> Reply: ")[1].split("\n>> Prompt: ")[0]
    second = text.split(">> Reply: ")[2].split("\n>> Prompt: ")[0]
    assert first and second
    assert "Traceback" not in err.text()
    # the interrupted reply stayed in the cache: the next turn prefilled only its own tokens (+ 1)
    prefilled = int(re.search(r"\((\d+) prefilled", stats).group(1))
    assert prefilled <= len(tokenizer.encode(get_style("raw").next_turn("And then?"))) + 1
