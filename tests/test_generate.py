"""Sampling and generation: greedy equals transformers, the sampler's distribution, stops, streaming, the script."""

import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from hf_checkpoints import lively_checkpoint
from lit_gpt import gemv
from lit_gpt.load import load_model
from lit_gpt.cli import unescape
from lit_gpt.device import choose_device, cpu_supports_bf16
from lit_gpt.generate import Completion, compile_decode, generate, generate_tokens, make_generator, sample, stream
from lit_gpt.prompts import STYLES, get_style, style_for_checkpoint
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import UserError

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 128
EOS = 50256


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen") / "phi-2"
    hf = lively_checkpoint(d, BLOCK)
    return d, hf, load_model(d), Tokenizer(d)


def greedy_hf(hf, idx: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        out = hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=n,
                          min_new_tokens=n, pad_token_id=EOS)
    return out[:, idx.size(1):]


# --- greedy decoding equals transformers ---

@pytest.mark.parametrize("prompt_len", [1, 6, 29])
def test_greedy_matches_transformers(ckpt, prompt_len):
    _, hf, model, _ = ckpt
    torch.manual_seed(prompt_len)
    prompt = torch.randint(0, 50000, (prompt_len,))
    ours = torch.stack(list(generate_tokens(model, prompt, prompt_len + 32, temperature=0.0)), dim=1)
    expected = greedy_hf(hf, prompt[None], 32)
    assert ours.shape == (1, 32)
    assert ours.tolist() == expected.tolist()


@pytest.mark.slow
def test_greedy_batch_matches_transformers(ckpt):
    _, hf, model, tokenizer = ckpt
    prompts = torch.randint(0, 50000, (3, 9))  # three different prompts of one length: no padding needed
    ours = torch.stack(list(generate_tokens(model, prompts, 9 + 32, temperature=0.0)), dim=1)
    assert ours.tolist() == greedy_hf(hf, prompts, 32).tolist()

    # num_samples copies of one prompt, through the text layer: every sample is transformers' greedy output
    prompt = tokenizer.encode("Alice: hello\nBob:")
    completions = generate(model, tokenizer, prompt, len(prompt) + 32, num_samples=3, temperature=0.0,
                           ignore_eos=True)
    expected = greedy_hf(hf, prompt[None], 32)[0].tolist()
    assert [c.ids for c in completions] == [expected] * 3
    assert all(c.finish_reason == "length" and c.text == tokenizer.decode(expected) for c in completions)


class KernelCalls:
    """Stands in for gemv.py's loaded library: counts the calls into it and passes them on."""

    def __init__(self, lib) -> None:
        self.lib, self.calls = lib, Counter()

    def __getattr__(self, name: str):
        fn = getattr(self.lib, name)

        def call(*args):
            self.calls[name] += 1
            return fn(*args)

        return call


@pytest.mark.parametrize(("dtype", "quantize", "kernel", "one_call"), [
    (torch.float32, None, None, False), (torch.bfloat16, None, "gemv_bf16", True),
    (torch.bfloat16, None, "gemv_bf16", False), (torch.bfloat16, "int8", "gemv_int8", True),
    (torch.bfloat16, "int8", "gemv_int8", False), (torch.bfloat16, "int4", "gemv_int4", True),
    (torch.bfloat16, "int4", "gemv_int4", False)])
@pytest.mark.slow
def test_compiled_decode_gives_the_eager_tokens(ckpt, dtype, quantize, kernel, one_call, monkeypatch):
    d = ckpt[0]
    model = load_model(d, dtype=dtype, quantize=quantize, group_size=32)
    prompt = torch.randint(0, 50000, (6,))
    if not one_call:  # each step op by op, as where the one call declines (a layer or a shape it does not take)
        monkeypatch.setattr(gemv, "decode_blocks", lambda *args, **kwargs: None)

    def decode(forward):  # greedy tokens, and the logits of every decode step
        logits = []

        def step(idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
            logits.append(forward(idx, input_pos))
            return logits[-1]

        tokens = torch.stack(list(generate_tokens(model, prompt, 6 + 16, temperature=0.0, decode_forward=step)), dim=1)
        return tokens, torch.cat(logits)

    eager, eager_logits = decode(model)
    compiled = compile_decode(model)
    if kernel and gemv.available():  # on CPUs with AVX-512 BF16 (and VNNI, VBMI), bf16 steps call our kernels
        spy = KernelCalls(gemv._lib)
        monkeypatch.setattr(gemv, "_lib", spy)
    ours, logits = decode(compiled)
    assert ours.tolist() == eager.tolist()
    if kernel and gemv.available():  # inductor rounds as eager does, around the same kernels: the same logits
        assert torch.equal(logits, eager_logits)
        layers = model.config.n_layer
        if one_call:  # the blocks in one eager call (a graph break) between the compiled embedding and head
            assert spy.calls["decode_blocks"] == 15 and spy.calls["attend_one"] == 0, spy.calls
        else:  # the kernels as custom ops in the compiled graph
            assert spy.calls["attend_one"] == 15 * layers and spy.calls[kernel] >= 15 * 4 * layers, spy.calls


def test_without_the_kernels_a_step_compiles_as_one_graph(ckpt, monkeypatch):
    """The one-call step's graph break is only where the kernels are: compile_decode compiles a CPU without them
    with fullgraph (max-autotune's weight packing needs the whole graph), which a break would fail."""
    model = load_model(ckpt[0], dtype=torch.bfloat16)
    monkeypatch.setattr(gemv, "available", lambda: False)
    model.set_kv_cache(1, max_seq_length=16)
    step = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), torch.arange(3))
        logits = step(torch.tensor([[4]]), torch.tensor([3]))
    assert logits.shape == (1, 1, model.config.padded_vocab_size) and torch.isfinite(logits).all()


def test_generate_continues_a_cache(ckpt):
    """start_pos: a second prompt prefilled on top of the first equals one generation over both."""
    _, _, model, _ = ckpt
    a, b = torch.randint(0, 50000, (7,)), torch.randint(0, 50000, (5,))
    whole = torch.stack(list(generate_tokens(model, torch.cat((a, b)), 12 + 10, temperature=0.0)), dim=1)
    model.set_kv_cache(1, max_seq_length=BLOCK)
    for _ in generate_tokens(model, a, 8, temperature=0.0):  # one step: only the prefill of `a` enters the cache
        break
    cont = torch.stack(list(generate_tokens(model, b, 5 + 10, start_pos=7, temperature=0.0)), dim=1)
    assert cont.tolist() == whole.tolist()


# --- the sampler draws from the truncated, renormalised distribution ---

def expected_distribution(logits: list[float], temperature: float, top_k, top_p: float) -> list[float]:
    """Written independently of `sample`: plain Python over a small vocabulary."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    keep = order[:top_k] if top_k else order
    z = sum(math.exp(scaled[i]) for i in keep)
    p = {i: math.exp(scaled[i]) / z for i in keep}
    nucleus, mass = [], 0.0
    for i in keep:  # most likely first; stop once the kept mass reaches top_p
        if mass >= top_p:
            break
        nucleus.append(i)
        mass += p[i]
    total = sum(p[i] for i in nucleus)
    return [p[i] / total if i in nucleus else 0.0 for i in range(len(logits))]


def chi2_bound(df: int, z: float = 4.5) -> float:
    """Wilson-Hilferty: the chi-square quantile ~ z standard deviations up (z=4.5: p ~ 3e-6)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, None, 1.0), (0.7, None, 1.0), (1.0, 4, 1.0), (1.5, 5, 1.0),
    (1.0, None, 0.6), (0.8, None, 0.9), (1.3, 6, 0.7), (1.0, 3, 0.5),
])
def test_sample_distribution(temperature, top_k, top_p):
    torch.manual_seed(1)
    logits = (torch.randn(12) * 1.5).tolist()
    probs = expected_distribution(logits, temperature, top_k, top_p)
    n = 40_000
    draws = sample(torch.tensor([logits] * n), temperature, top_k, top_p, make_generator(torch.device("cpu"), 3))
    counts = Counter(draws.tolist())
    kept = [i for i, p in enumerate(probs) if p > 0]
    assert set(counts) <= set(kept), "drew a token outside the top-k / top-p set"
    chi2 = sum((counts.get(i, 0) - n * probs[i]) ** 2 / (n * probs[i]) for i in kept)
    if len(kept) > 1:
        assert chi2 < chi2_bound(len(kept) - 1), (chi2, probs, counts)
    else:
        assert counts[kept[0]] == n


def test_sample_greedy_and_shapes():
    logits = torch.randn(4, 3, 50)
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1))
    assert torch.equal(sample(logits, 1.0, top_k=1), logits.argmax(-1))
    assert sample(logits, 0.9, 10, 0.9).shape == (4, 3)
    for bad in (dict(temperature=-1.0), dict(temperature=1.0, top_k=0), dict(temperature=1.0, top_p=0.0),
                dict(temperature=1.0, top_p=1.5)):
        with pytest.raises(UserError):
            sample(logits, **bad)


def test_fixed_seed_reproduces_a_run(ckpt):
    _, _, model, tokenizer = ckpt
    prompt = tokenizer.encode("Instruct: say something\nOutput:")

    def run(seed):
        gen = make_generator(torch.device("cpu"), seed)
        return [c.ids for c in generate(model, tokenizer, prompt, len(prompt) + 40, num_samples=2,
                                        temperature=1.0, top_k=50, top_p=0.95, generator=gen, ignore_eos=True)]

    first = run(42)
    assert first == run(42)
    assert first != run(43)
    assert first[0] != first[1]  # the samples of a batch differ


def test_context_limits(ckpt):
    _, _, model, tokenizer = ckpt
    prompt = torch.randint(0, 50000, (20,))
    with pytest.raises(UserError, match="exceed the model's context of 128 tokens"):
        next(generate_tokens(model, prompt, BLOCK + 1))
    with pytest.raises(UserError, match="the prompt is 128 tokens"):
        next(generate_tokens(model, torch.randint(0, 50000, (BLOCK,)), BLOCK))
    assert len(list(generate_tokens(model, prompt, BLOCK, temperature=0.0))) == BLOCK - 20  # the very end is fine


# --- stop sequences and streaming text ---

def feed(tokenizer, text: str, stops=(), eos=None, extra=()) -> tuple[list[str], Completion]:
    c = Completion(tokenizer, stops, eos)
    deltas = [c.add(i) for i in tokenizer.encode(text).tolist() + list(extra)]
    deltas.append(c.finish())
    return deltas, c


def test_stop_sequence_split_across_tokens_is_never_released(ckpt):
    *_, tokenizer = ckpt
    # "Instruct" + ":" are two tokens; the stop is only certain when ":" arrives
    deltas, c = feed(tokenizer, "Sure, here.\nInstruct: next", STYLES["phi-2"].stop_sequences)
    assert c.text == "".join(deltas) == "Sure, here.\n"
    assert c.finish_reason == "stop"
    # a false start is held back, then released once it cannot be a stop any more
    deltas, c = feed(tokenizer, "Read.\nInstructions follow", ["Instruct:"])
    assert deltas == ["Read", ".", "\n", "", "Instructions", " follow", ""] and c.finish_reason == "length"
    # a stop that starts and ends inside tokens
    deltas, c = feed(tokenizer, "Sure, here.\nInstruct: next", ["ruct: ne"])
    assert "".join(deltas) == "Sure, here.\nInst"
    # held-back text that never became a stop is released at the end
    deltas, c = feed(tokenizer, "The end. Instr", ["Instruct:"])
    assert "".join(deltas) == "The end. Instr" and c.finish_reason == "length"
    # eos ends a sample and is never printed
    deltas, c = feed(tokenizer, "bye", eos=EOS, extra=[EOS, 1000])
    assert "".join(deltas) == "bye" and c.finish_reason == "eos" and c.ids[-1] == EOS


def test_every_eos_id_and_stop_token_ends_a_sample(ckpt, tmp_path):
    d, _, model, tokenizer = ckpt
    dot = tokenizer.encode(".").item()
    deltas, c = feed(tokenizer, "bye", eos=[EOS, dot], extra=[dot, 1000])
    assert "".join(deltas) == "bye" and c.finish_reason == "eos" and c.ids[-1] == dot
    deltas, c = feed(tokenizer, "bye. more", eos=EOS)
    assert "".join(deltas) == "bye. more"
    c = Completion(tokenizer, (), EOS, stop_ids=[dot])  # an end-of-turn token: "stop", and never printed
    assert [c.add(i) for i in tokenizer.encode("bye. more").tolist()] == ["bye", "", ""] and c.finish_reason == "stop"
    # stream() stops at every eos id the checkpoint's generation_config.json lists
    prompt = tokenizer.encode("Once upon a time")
    [greedy] = generate(model, tokenizer, prompt, len(prompt) + 3, temperature=0.0, ignore_eos=True)
    (tmp_path / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes())
    (tmp_path / "generation_config.json").write_text(f'{{"eos_token_id": [{EOS}, {greedy.ids[1]}]}}')
    [c] = generate(model, Tokenizer(tmp_path), prompt, len(prompt) + 10, temperature=0.0)
    assert c.ids == greedy.ids[:2] and c.finish_reason == "eos" and c.text == tokenizer.decode(greedy.ids[:1])


def test_emoji_and_cjk_stream_intact(ckpt):
    *_, tokenizer = ckpt
    text = "日本語のテキスト 😀🎉 ok"
    deltas, c = feed(tokenizer, text)
    assert "".join(deltas) == text
    assert "" in deltas[:-1]  # some tokens carry only part of a character: nothing is released for them
    assert all("\ufffd" not in d for d in deltas)
    # a stop sequence inside a run of multi-byte characters
    deltas, c = feed(tokenizer, text, ["🎉"])
    assert "".join(deltas) == "日本語のテキスト 😀" and c.finish_reason == "stop"


def test_model_output_stop_cut_end_to_end(ckpt):
    """A stop sequence the model really produces, across a token boundary, is cut from the stream."""
    _, _, model, tokenizer = ckpt
    prompt = tokenizer.encode("Alice: tell me a story\nBob:")
    kwargs = dict(temperature=1.0, top_k=100, ignore_eos=True)
    [c] = generate(model, tokenizer, prompt, len(prompt) + 40, generator=make_generator(torch.device("cpu"), 5),
                   **kwargs)
    ids, text = c.ids, c.text
    assert text == tokenizer.decode(ids)
    # a stop from the middle of token i to the middle of token i + 1
    for i in range(2, len(ids) - 1):
        a, mid, b = (len(tokenizer.decode(ids[:j])) for j in (i, i + 1, i + 2))
        if mid - a >= 2 and b - mid >= 2 and tokenizer.decode(ids[:i + 2]) == text[:b]:
            stop = text[a + 1:b - 1]
            if text.find(stop) == a + 1:
                break
    else:
        pytest.fail("no suitable stop in the generated text")
    deltas = []
    for completions in stream(model, tokenizer, prompt, len(prompt) + 40, stop_sequences=[stop],
                              generator=make_generator(torch.device("cpu"), 5), **kwargs):
        deltas.append(completions[0].delta)
    assert "".join(deltas) == text[:a + 1]
    assert completions[0].finish_reason == "stop"
    assert len(completions[0].ids) == i + 2  # stopped as soon as the stop was complete


def test_batch_samples_stop_separately(ckpt):
    _, _, model, tokenizer = ckpt
    prompt = tokenizer.encode("Once upon a time")
    gen = make_generator(torch.device("cpu"), 0)
    [c] = generate(model, tokenizer, prompt, len(prompt) + 30, temperature=0.0, ignore_eos=True)
    stop = tokenizer.decode(c.ids[10:12])  # greedy sample 0 hits this at step 12; sampled ones won't
    completions = generate(model, tokenizer, prompt, len(prompt) + 30, num_samples=3, temperature=0.0,
                           stop_sequences=[stop], ignore_eos=True, generator=gen)
    assert all(x.finish_reason == "stop" and x.text == c.text[:c.text.find(stop)] for x in completions)
    # sampled: each sample stops at its own first "e", the others go on
    sampled = generate(model, tokenizer, prompt, len(prompt) + 30, num_samples=4, temperature=1.0,
                       stop_sequences=["e"], ignore_eos=True, generator=gen)
    for x in sampled:
        assert "e" not in x.text
        if x.finish_reason == "stop":
            assert "e" in tokenizer.decode(x.ids) and "e" not in tokenizer.decode(x.ids[:-1])
        else:
            assert x.finish_reason == "length" and len(x.ids) == 30 and "e" not in tokenizer.decode(x.ids)
    assert len({len(x.ids) for x in sampled}) > 1


# --- prompt styles ---

def test_prompt_styles(ckpt, tmp_path):
    d = ckpt[0]
    assert style_for_checkpoint(d).name == "phi-2"  # the checkpoint's directory is named phi-2
    assert get_style("phi-2").apply("Hi") == "Instruct: Hi\nOutput:"
    assert get_style("phi-1_5").apply("Hi") == "Hi\n\nAnswer:"
    assert get_style("phi-1").apply("Hi") == "Hi\n\nAnswer:"
    assert get_style("raw").apply("Hi") == "Hi"
    assert style_for_checkpoint(d, "phi-2-chat").apply("Hi") == "Alice: Hi\nBob:"
    for name, expected in (("phi-1_5", "phi-1_5"), ("phi-1", "phi-1"), ("phi-2-finetuned", "phi-2"), ("gpt2", "raw")):
        (tmp_path / "lit_config.json").write_text(f'{{"name": "{name}", "hf_config": {{}}}}')
        assert style_for_checkpoint(tmp_path).name == expected
    (tmp_path / "lit_config.json").write_text('{"name": "x", "hf_config": {"org": "microsoft", "name": "phi-1_5"}}')
    assert style_for_checkpoint(tmp_path).name == "phi-1_5"
    for name, expected in (("Phi-3-mini-4k-instruct", "phi-3"), ("Phi-3.5-mini-instruct", "phi-3"),
                           ("Phi-4-mini-instruct", "phi-4-mini"), ("phi-4", "phi-4"), ("Phi-4-reasoning", "phi-4")):
        (tmp_path / "lit_config.json").write_text(f'{{"name": "x", "hf_config": {{"name": "{name}"}}}}')
        assert style_for_checkpoint(tmp_path).name == expected
    with pytest.raises(UserError, match="prompt_style must be one of raw, phi-2, phi-2-chat, phi-1_5, phi-1, phi-3, "
                                        "phi-4-mini, phi-4, got 'llama'"):
        get_style("llama")
    style = get_style("phi-2")
    assert style.conversation([("a", " A.\n"), ("b", None)]) == "Instruct: a\nOutput: A.\nInstruct: b\nOutput:"
    assert {"Instruct:", "Output:", "Alice:", "Bob:", "Answer:"} <= set(style.stop_sequences)
    assert unescape(r"Alice: hi\nBob:\t\\n") == "Alice: hi\nBob:\t\\n"


def test_device_and_precision_choice():
    device, precision, dtype = choose_device()
    if not torch.cuda.is_available():
        assert device.type == "cpu"
        expected = ("bf16-true", torch.bfloat16) if cpu_supports_bf16() else ("32-true", torch.float32)
        assert (precision, dtype) == expected
    assert choose_device("16-true")[1:] == ("16-true", torch.float16)
    with pytest.raises(UserError, match="precision must be one of bf16-true, 16-true, 32-true, got 'fp32'"):
        choose_device("fp32")


def test_bf16_generation_runs(ckpt):
    d, _, _, tokenizer = ckpt
    model = load_model(d, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    prompt = tokenizer.encode("Hello")
    [c] = generate(model, tokenizer, prompt, len(prompt) + 8, temperature=0.7, top_k=20)
    assert len(c.ids) <= 8 and c.finish_reason in ("length", "eos")


# --- the script ---

def run_script(*args, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = (*args, "--precision", "32-true")  # exact comparisons with the in-process fp32 model
    return subprocess.run([sys.executable, str(ROOT / "generate" / "base.py"), *args], capture_output=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_generate_script_streams_continuation_and_stats(ckpt):
    d, _, model, tokenizer = ckpt
    prompt = "Alice: hi 😀 日本語\nBob:"
    r = run_script("--prompt", r"Alice: hi 😀 日本語\nBob:", "--checkpoint_dir", str(d), "--max_new_tokens", "24",
                   "--temperature", "0")
    out, err = r.stdout.decode("utf-8"), r.stderr.decode("utf-8")
    assert r.returncode == 0, err
    ids = tokenizer.encode(prompt)
    [c] = generate(model, tokenizer, ids, len(ids) + 24, temperature=0.0)
    assert out == prompt + c.text + "\n"
    assert "Time to first token:" in err
    assert "tokens/s" in err
    assert "bandwidth achieved" in err and "GB/s" in err
    assert "Peak memory:" in err


@pytest.mark.slow
def test_generate_script_samples_with_seed(ckpt):
    d, _, model, tokenizer = ckpt
    r = run_script("--prompt", "Instruct: hi", "--checkpoint_dir", str(d), "--max_new_tokens", "16",
                   "--num_samples", "2", "--seed", "7", "--top_k", "50", "--top_p", "0.9", "--temperature", "1.2")
    assert r.returncode == 0, r.stderr.decode()
    ids = tokenizer.encode("Instruct: hi")
    completions = generate(model, tokenizer, ids, len(ids) + 16, num_samples=2, temperature=1.2, top_k=50,
                           top_p=0.9, generator=make_generator(torch.device("cpu"), 7))
    expected = "".join(f"--- sample {i + 1} ({c.finish_reason}) ---\nInstruct: hi{c.text}\n"
                       for i, c in enumerate(completions))
    assert r.stdout.decode("utf-8") == expected


@pytest.mark.slow
def test_generate_script_prompt_too_long(ckpt):
    d = ckpt[0]
    r = run_script("--prompt", "word " * 199 + "word", "--checkpoint_dir", str(d))
    err = r.stderr.decode()
    assert r.returncode == 1
    assert "error: the prompt is 200 tokens, longer than the model's context of 128 tokens" in err
    assert "Traceback" not in err
    r = run_script("--prompt", "word " * 99 + "word", "--checkpoint_dir", str(d), "--max_new_tokens", "50")
    assert r.returncode == 1
    assert "use --max_new_tokens 28 or less" in r.stderr.decode()


def test_running_out_of_memory_is_one_line_not_a_traceback(tmp_path):
    """The scripts' common entry point: a real MemoryError (here Python's, asking for a terabyte) ends as one
    `error:` line and exit code 1."""
    script = tmp_path / "oom.py"
    script.write_text(
        "from lit_gpt.cli import run_cli\n"
        "def main() -> None:\n"
        "    '''Ask for a terabyte.'''\n"
        "    bytearray(1 << 40)\n"
        "run_cli(main)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: out of memory"), proc.stderr
