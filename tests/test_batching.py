"""Continuous batching (lit_gpt/batching.py) and what it needs of the model: a prompt prefilled into one row of
the KV cache, and decode steps in which every row is at its own position. Each sequence must get the numbers it
gets alone, whatever the other rows hold."""

import threading
import time

import pytest
import torch

from lit_gpt.batching import Engine, QueueFull, Request, serving_context
from lit_gpt.config import Config
from lit_gpt.generate import generate_tokens
from lit_gpt.load import load_model
from lit_gpt.model import GPT
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import InvalidArgument, UserError

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "phi-2": dict(name="phi-2", n_layer=2, n_embd=64, n_head=4, intermediate_size=128),
    # grouped-query attention and a sliding window shorter than the sequences
    "phi-3-window": dict(name="Phi-3-mini-4k-instruct", n_layer=2, n_embd=64, n_head=4, n_query_groups=2,
                         intermediate_size=96, sliding_window=6),
}


def tiny(name: str, dtype: torch.dtype) -> GPT:
    kwargs = dict(CONFIGS[name])
    config = Config.from_name(kwargs.pop("name"), block_size=64, vocab_size=100, padded_vocab_size=128, **kwargs)
    return GPT(config).to(dtype).eval()


def alone(model: GPT, prompt: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """The last logits of the prompt's prefill and of `steps` greedy decode steps, in a cache of one row; and the
    tokens those steps were fed."""
    model.set_kv_cache(1, max_seq_length=32)
    logits = model(prompt[None], torch.arange(len(prompt)))[0, -1]
    out, fed, pos = [logits], [], len(prompt)
    for _ in range(steps):
        fed.append(int(logits.argmax()))
        logits = model(torch.tensor([[fed[-1]]]), torch.tensor([pos]))[0, -1]
        out.append(logits)
        pos += 1
    return out, fed


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
@torch.inference_mode()
def test_rows_at_their_own_positions_compute_what_each_sequence_computes_alone(name, dtype, tolerance):
    model = tiny(name, dtype)
    prompts = [torch.randint(0, 100, (n,)) for n in (5, 11, 2)]
    expected = [alone(model, p, 8) for p in prompts]

    model.set_kv_cache(4, max_seq_length=32)  # row 3 stays idle, on a dummy token
    got = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        # a prefill into row i, in two chunks, the other rows holding their own
        cut = min(3, len(p) - 1)
        model(p[None, :cut], torch.arange(cut), row=i)
        got[i].append(model(p[None, cut:], torch.arange(cut, len(p)), row=i)[0, -1])
    positions = torch.tensor([[len(p)] for p in prompts] + [[0]])
    for step in range(8):
        # each row fed the token it was fed alone (bf16 logits differ in the last bit, and a near tie could
        # otherwise send a row down another path)
        tokens = torch.tensor([[fed[step]] for _, fed in expected] + [[0]])
        logits = model(tokens, positions)[:, -1]
        for i in range(len(prompts)):
            got[i].append(logits[i])
        positions += 1
    for ours, (theirs, _) in zip(got, expected):
        assert torch.allclose(torch.stack(ours).float(), torch.stack(theirs).float(), atol=tolerance, rtol=0)


def test_per_row_positions_are_for_one_token_steps():
    model = tiny("phi-2", torch.float32)
    model.set_kv_cache(2, max_seq_length=16)
    with pytest.raises(ValueError, match=r"one-token decode steps over every row: got input_pos of shape \(2, 3\)"):
        model(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))


@pytest.fixture(scope="module")
def demo(demo_checkpoint):
    return load_model(demo_checkpoint, dtype=torch.float32), Tokenizer(demo_checkpoint)


def run(engine: Engine, requests: list[Request], stagger: float = 0.0) -> list[str]:
    """Submit the requests (`stagger` seconds apart) and wait for each one's text."""
    texts = {r.id: [] for r in requests}
    done = {r.id: threading.Event() for r in requests}

    def on_text(r: Request):
        def take(text: str, finish):
            texts[r.id].append(text)
            if finish is not None:
                done[r.id].set()
        return take

    for r in requests:
        r.on_text = on_text(r)
        engine.submit(r)
        time.sleep(stagger)
    for r in requests:
        assert done[r.id].wait(timeout=120)
    return ["".join(texts[r.id]) for r in requests]


PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef read_file(path):", "class Stack:\n    def __init__(self):",
           "for i in range(10):", "# a long comment\n" * 20]


def test_the_engine_gives_each_request_the_tokens_it_gets_alone(demo):
    model, tokenizer = demo
    engine = Engine(model, tokenizer, max_batch_size=3, max_seq_length=256, prefill_chunk=16)
    engine.start()
    try:
        jobs = [(PROMPTS[i % len(PROMPTS)], 6 + 5 * i) for i in range(7)]
        served_alone = [run(engine, [Request(tokenizer.encode(p).tolist(), n, temperature=0)])[0] for p, n in jobs]
        # 7 requests on 3 rows: the rest queue; long prompts prefill in chunks while others decode
        together = run(engine, [Request(tokenizer.encode(p).tolist(), n, temperature=0) for p, n in jobs], 0.01)
        assert together == served_alone and engine.finished == 14
    finally:
        engine.stop()
    # and alone is what generate computes
    ids = tokenizer.encode(jobs[0][0])
    model.set_kv_cache(1, max_seq_length=64)
    tokens = [int(t) for t in generate_tokens(model, ids, len(ids) + jobs[0][1], temperature=0.0)]
    assert served_alone[0] == tokenizer.decode(torch.tensor(tokens))


def test_sampling_is_per_request_and_seeded(demo):
    model, tokenizer = demo
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_length=128)
    engine.start()
    try:
        ids = tokenizer.encode(PROMPTS[0]).tolist()
        seeded = [Request(ids, 20, temperature=1.0, top_p=0.9, seed=s) for s in (1, 2, 1)]
        a, b, c = run(engine, seeded)
        assert a == c and a != b  # the same seed, the same text, whoever shares the steps
    finally:
        engine.stop()


def test_a_cancelled_request_frees_its_row_and_a_full_queue_refuses(demo):
    model, tokenizer = demo
    engine = Engine(model, tokenizer, max_batch_size=1, max_seq_length=256, max_queue=1)
    ids = tokenizer.encode(PROMPTS[0]).tolist()
    first, second = Request(ids, 200, temperature=0), Request(ids, 3, temperature=0)
    engine.submit(first)
    engine.submit(second)  # queued
    with pytest.raises(QueueFull, match="all 1 slots are busy and 1 requests wait"):
        engine.submit(Request(ids, 3))
    with pytest.raises(UserError, match=r"max_tokens \(256\) exceed the context of 256 tokens"):
        engine.submit(Request(ids, 256))
    engine.cancel(first)  # before it ran: dropped as it would be mid-stream
    engine.start()
    try:
        second_done = threading.Event()
        second.on_text = lambda text, finish: finish is not None and second_done.set()
        assert second_done.wait(timeout=60)
        assert (engine.finished, engine.cancelled, second.generated) == (1, 1, 3)
    finally:
        engine.stop()


def test_serving_context():
    phi2 = Config.from_name("phi-2")
    assert serving_context(phi2) == 2048 and serving_context(phi2, 512) == 512
    with pytest.raises(InvalidArgument, match="max_seq_length is 4096, beyond the 2048 tokens"):
        serving_context(phi2, 4096)
    phi35 = Config.from_name("Phi-3.5-mini-instruct")
    assert phi35.longrope and serving_context(phi35) == phi35.rope_original_max_seq_len == 4096
    with pytest.raises(InvalidArgument, match="a longrope model is served up to its original_max_position_embeddings"):
        serving_context(phi35, 8192)


def test_a_failing_step_fails_the_requests_in_flight_and_the_engine_goes_on(demo, capfd):
    """A fault in a step (injected: out of memory) ends the requests in flight with "error", the traceback on
    stderr; the next request is served."""
    model, tokenizer = demo
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_length=128)
    real = model.forward
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected: out of memory")
        return real(*args, **kwargs)

    ids = tokenizer.encode(PROMPTS[0]).tolist()
    finishes = []
    request = Request(ids, 10, temperature=0, on_text=lambda text, finish: finish and finishes.append(finish))
    model.forward = failing
    engine.start()
    try:
        engine.submit(request)
        deadline = time.monotonic() + 60
        while not finishes and time.monotonic() < deadline:
            time.sleep(0.05)
        assert finishes == ["error"] and "injected: out of memory" in capfd.readouterr().err
        del model.forward
        assert run(engine, [Request(ids, 5, temperature=0)])[0]
    finally:
        model.__dict__.pop("forward", None)
        engine.stop()
