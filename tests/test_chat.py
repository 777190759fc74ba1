"""Multi-turn chat: turns kept in the KV cache, context overflow, interruption, and chat/base.py end to end."""

import json
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

from lit_gpt.convert import convert_hf_checkpoint
from lit_gpt.load import load_model
from lit_gpt.generate import ChatSession, generate, generate_tokens
from lit_gpt.prompts import ChatTemplate, get_style, style_for_checkpoint
from lit_gpt.tokenizer import GENERATION_IDS, Tokenizer, write_phi3_tokenizer
from lit_gpt.utils import UserError
from hf_checkpoints import hf_state_dict, lively_checkpoint, save_weights

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
BLOCK = 1024
SYSTEM = "You are a terse assistant."


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


# --- a chat template, with Phi-3's tokenizer: end-of-turn tokens, the system prompt, the cache across turns ---

def end_turn_bias(model, tokenizer: Tokenizer, prompt: list[int], end_id: int) -> tuple[torch.Tensor, int]:
    """An LM head bias under which greedy decoding of `prompt` emits `end_id` at some step k >= 3 and nothing
    else changes before it: only that id's logit rises, by just enough. Rows no token uses (the model's
    padding) are never chosen, as in a trained model. Returns the bias and k."""
    bias = model.lm_head.bias.detach().clone()
    bias[tokenizer.vocab_size:] = -1e4
    logits = []
    with torch.no_grad():
        model.lm_head.bias.copy_(bias)
        handle = model.register_forward_hook(lambda m, args, out: logits.append(out[0, -1].float()))
        list(generate_tokens(model, torch.tensor(prompt), len(prompt) + 40, temperature=0.0))
        handle.remove()
    gaps = [float(x.max() - x[end_id]) for x in logits]  # how far the end token is from being chosen
    k = next(k for k in range(3, len(gaps)) if gaps[k] < min(gaps[:k]))
    bias[end_id] += (gaps[k] + min(gaps[:k])) / 2
    return bias, k


@pytest.fixture(scope="module")
def phi3_ckpt(tmp_path_factory):  # ~5 s: the tests that use it are in the slow tier
    """A random model (Phi-2's block) with Phi-3.5's tokenizer files, chat template and generation_config.json
    (stop at <|endoftext|>, <|assistant|>, <|end|>), whose first greedy reply ends with <|end|> after k tokens."""
    d = tmp_path_factory.mktemp("chat-phi3") / "phi-3-random"
    hf = lively_checkpoint(d, BLOCK)
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json"):
        (d / name).unlink()
    template = (DATA / "chat_templates" / "microsoft-Phi-3.5-mini-instruct.jinja").read_text(encoding="utf-8")
    write_phi3_tokenizer(d, DATA / "llama.cpp" / "ggml-vocab-phi-3.gguf.xz", chat_template=template)
    (d / "generation_config.json").write_text(json.dumps(GENERATION_IDS["phi-3"]))
    tokenizer = Tokenizer(d)
    first = tokenizer.encode(style_for_checkpoint(d).conversation([("Hello there!", None)], SYSTEM)).tolist()
    bias, k = end_turn_bias(load_model(d), tokenizer, first, tokenizer.token_to_id("<|end|>"))
    with torch.no_grad():
        hf.lm_head.bias.copy_(bias)
    save_weights(hf_state_dict(hf, "phi"), d, "safetensors", 1)
    convert_hf_checkpoint(d, show_progress=False)
    return d, tokenizer, k


@pytest.mark.slow
def test_end_of_turn_token_is_never_printed_and_turns_stay_cached(phi3_ckpt):
    d, tokenizer, k = phi3_ckpt
    model, fresh = load_model(d), load_model(d)
    style = style_for_checkpoint(d)
    assert isinstance(style, ChatTemplate) and style.name == "the checkpoint's own"
    session = ChatSession(model, tokenizer, style, system=SYSTEM, max_new_tokens=40, temperature=0.0)
    calls, handle = count_forward(model)
    chunks = list(session.reply("Hello there!"))
    end = tokenizer.token_to_id("<|end|>")
    assert session.stats["tokens"] == k + 1  # k tokens of reply, then <|end|>, which ends it
    assert session.ids[:session.reply_start] == tokenizer.encode(
        "<|system|>\n" + SYSTEM + "<|end|>\n<|user|>\nHello there!<|end|>\n<|assistant|>\n").tolist()
    reply = "".join(chunks)
    assert "<|end|>" not in reply and all("<|" not in c for c in chunks)
    assert reply == session.turns[0][1] == expected_reply(fresh, tokenizer, session)
    for prompt in ("And then?", "Tell me more."):
        before, cached = list(session.ids), session.cached
        calls.clear()
        reply = "".join(session.reply(prompt))
        (prefill, start), decode = calls[0], calls[1:]
        # the cache is kept as far as the new rendering continues it, and only the rest is prefilled (the random
        # model's reply tokens need not be how the tokenizer spells its text, so that may be inside the reply)
        rendered = session.ids[:session.reply_start]
        same = next(i for i, (a, b) in enumerate(zip([*before[:cached], None], rendered)) if a != b)
        assert start == same and prefill == len(rendered) - start
        assert start >= len(tokenizer.encode(style.conversation([("Hello there!", None)], SYSTEM)))
        assert all(n == 1 for n, _ in decode)
        assert "<|end|>" not in reply and reply == expected_reply(fresh, tokenizer, session)
        assert session.ids[:session.reply_start] == tokenizer.encode(
            style.conversation([*session.turns[:-1], (prompt, None)], SYSTEM)).tolist()
    handle.remove()
    assert end in session.ids  # the finished turns end with <|end|>, as the template renders them


@pytest.mark.slow
def test_template_conversation_drops_the_oldest_turns_but_keeps_the_system_prompt(phi3_ckpt):
    d, tokenizer, _ = phi3_ckpt
    model, fresh = load_model(d), load_model(d)
    model.set_kv_cache(1, max_seq_length=160)
    fresh.set_kv_cache(1, max_seq_length=160)
    notices = []
    session = ChatSession(model, tokenizer, style_for_checkpoint(d), system=SYSTEM, max_new_tokens=30,
                          temperature=0.0, notify=notices.append)
    for i in range(5):
        reply = "".join(session.reply(f"Question number {i}: what comes next in this story?"))
        assert len(session.ids) <= 160 and "<|" not in reply
        assert reply == expected_reply(fresh, tokenizer, session)
        assert session.ids[:session.reply_start] == tokenizer.encode(
            session.style.conversation([*session.turns[:-1], (session.turns[-1][0], None)], SYSTEM)).tolist()
    assert any("dropped the oldest" in n for n in notices) and 1 <= len(session.turns) < 5
    assert tokenizer.decode(session.ids).startswith(f"<|system|> {SYSTEM}<|end|>")


@pytest.mark.slow
def test_a_template_without_a_system_role_says_so(phi3_ckpt):
    d, tokenizer, _ = phi3_ckpt
    notices = []
    no_system = ChatTemplate("user-only", "{% for m in messages if m['role'] != 'system' %}{{ m['content'] }}"
                                          "{% endfor %}")
    ChatSession(load_model(d), tokenizer, no_system, system=SYSTEM, notify=notices.append)
    assert notices == ["[the chat template (user-only) has no place for a system prompt: it is left out]"]


@pytest.mark.slow
def test_chat_script_with_system_prompt_and_template(phi3_ckpt):
    d, tokenizer, k = phi3_ckpt
    prompts = ["Hello there!", "And then?"]
    r = subprocess.run(chat_command(d, "--temperature", "0", "--max_new_tokens", "20", "--precision", "32-true",
                                    "--system", SYSTEM),
                       input="\n".join(prompts).encode() + b"\n", capture_output=True, timeout=120, env=ENV)
    out, err = r.stdout.decode("utf-8"), r.stderr.decode("utf-8")
    assert r.returncode == 0 and "Traceback" not in err, err
    assert "Chat template: the checkpoint's own" in err
    session = ChatSession(load_model(d), tokenizer, style_for_checkpoint(d), system=SYSTEM, max_new_tokens=20,
                          temperature=0.0)
    replies = ["".join(session.reply(p)).lstrip() for p in prompts]
    assert out == f">> Prompt: >> Reply: {replies[0]}\n>> Prompt: >> Reply: {replies[1]}\n>> Prompt: \n"
    assert "<|" not in out
    assert f"{k + 1} tokens" in err  # the first reply: k tokens and <|end|>


def test_template_turns_reuse_the_cache(ckpt, fresh):
    """phi-4's template over Phi-2's tokenizer (its turn tokens are plain text there, stops matched as text): each
    turn renders the whole conversation and prefills from where it stops continuing the cache."""
    d, tokenizer = ckpt
    model = load_model(d)
    session = ChatSession(model, tokenizer, get_style("phi-4"), system=SYSTEM, max_new_tokens=24, temperature=0.0)
    calls, handle = count_forward(model)
    for i, prompt in enumerate(["Hello there, how are you?", "What is 2+2?", "Tell me more about it."]):
        before, cached = list(session.ids), session.cached
        calls.clear()
        reply = "".join(session.reply(prompt))
        rendered = session.ids[:session.reply_start]
        assert rendered == tokenizer.encode(session.style.conversation([*session.turns[:-1], (prompt, None)],
                                                                       SYSTEM)).tolist()
        same = next(i for i, (a, b) in enumerate(zip([*before[:cached], None], rendered)) if a != b)
        assert calls[0] == (len(rendered) - same, same)
        if i:
            assert same > len(before) // 2  # most of the conversation stayed in the cache
        assert "<|im" not in reply and reply == expected_reply(fresh, tokenizer, session)
    handle.remove()
