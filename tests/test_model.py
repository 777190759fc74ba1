"""Our GPT against transformers' PhiForCausalLM: same logits from every checkpoint naming scheme."""

import pytest
import torch
import torch.nn.functional as F

from hf_checkpoints import make_hf_checkpoint, tiny_hf_config
from lit_gpt import gemv
from lit_gpt.convert import convert_hf_checkpoint
from lit_gpt.load import load_model
from lit_gpt.config import Config
from lit_gpt.model import GPT, KVCache, Window

# (n_embd, n_head, rotary share): head sizes 16, 20, 32 and 80; rotary dims 8, 8, 32 and 32
SHAPES = [(64, 4, 0.5), (80, 4, 0.4), (96, 3, 1.0), (160, 2, 0.4)]
SCHEMES = ["phi", "phi-msft", "mixformer-sequential"]


# the first pair in the fast tier, all of them in the full suite
PAIRS = [pytest.param((s, scheme), marks=() if i == 0 else pytest.mark.slow)
         for i, (s, scheme) in enumerate((s, scheme) for s in SHAPES for scheme in SCHEMES)]


@pytest.fixture(scope="module", params=PAIRS, ids=lambda p: f"{p[0][0]}x{p[0][1]}-rot{p[0][2]}-{p[1]}")
def pair(request, tmp_path_factory):
    (n_embd, n_head, rotary), scheme = request.param
    d = tmp_path_factory.mktemp("ckpt")
    config = tiny_hf_config(n_embd=n_embd, n_head=n_head, rotary=rotary, n_layer=2)
    hf = make_hf_checkpoint(d, config, scheme=scheme, tokenizer=False)
    convert_hf_checkpoint(d, show_progress=False)
    return hf, load_model(d)


@pytest.mark.parametrize("length", [1, 7, 23])
def test_full_forward_matches_transformers(pair, length):
    hf, ours = pair
    idx = torch.randint(0, 51200, (2, length))
    with torch.no_grad():
        expected = hf(idx).logits
        actual = ours(idx)
    assert actual.shape == expected.shape == (2, length, 51200)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prompt_len", [1, 5])
def test_kv_cache_decoding_matches_transformers(pair, prompt_len):
    hf, ours = pair
    total = 24
    idx = torch.randint(0, 51200, (2, total))
    ours.set_kv_cache(batch_size=2, max_seq_length=32)
    with torch.no_grad():
        expected = hf(idx).logits
        steps = [ours(idx[:, :prompt_len], torch.arange(prompt_len))]
        for t in range(prompt_len, total):
            steps.append(ours(idx[:, t:t + 1], torch.tensor([t])))
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-5, rtol=0)


def test_prefill_on_top_of_cache_matches_full_forward(pair):
    """A second prompt prefilled after a first one (a new chat turn) sees the whole history."""
    hf, ours = pair
    idx = torch.randint(0, 51200, (1, 20))
    ours.set_kv_cache(batch_size=1, max_seq_length=32)
    with torch.no_grad():
        expected = hf(idx).logits
        first = ours(idx[:, :8], torch.arange(8))
        second = ours(idx[:, 8:], torch.arange(8, 20))
    torch.testing.assert_close(torch.cat((first, second), dim=1), expected, atol=1e-5, rtol=0)


def test_a_prefill_for_its_last_logits_gives_them_and_the_same_cache(pair):
    """last_only (generate's and the server's prefill) computes the LM head for the last position alone."""
    hf, ours = pair
    idx = torch.randint(0, 51200, (2, 12))
    with torch.no_grad():
        expected = hf(idx).logits[:, -1:]
        ours.set_kv_cache(batch_size=2, max_seq_length=16)
        last = ours(idx, torch.arange(12), last_only=True)
        step = ours(idx[:, :1], torch.tensor([12]))  # the cache it left holds the whole prompt
        ours.set_kv_cache(batch_size=2, max_seq_length=16)
        ours(idx, torch.arange(12))
        reference_step = ours(idx[:, :1], torch.tensor([12]))
    assert last.shape == (2, 1, expected.shape[-1])
    torch.testing.assert_close(last, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(step, reference_step, atol=0, rtol=0)


def test_cache_rejects_context_beyond_block_size(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="exceeds the model's context"):
        ours.set_kv_cache(batch_size=1, max_seq_length=ours.config.block_size + 1)


# --- the attention window and the cache, without transformers ---


def _tiny_gpt(dtype: torch.dtype = torch.float32) -> GPT:
    config = Config.from_name("phi-1_5", n_layer=1, n_embd=64, n_head=2, intermediate_size=128, block_size=32,
                              vocab_size=128, padded_vocab_size=128)
    return GPT(config).to(dtype).eval()


def test_the_attention_window_is_the_filled_cache_and_its_mask():
    model = _tiny_gpt()
    model.set_kv_cache(1, 16)
    assert model.attention_window(torch.tensor([5])) == Window(6, None)  # one query sees every cached position
    window = model.attention_window(torch.arange(2, 5))
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    assert window.length == 5 and torch.equal(window.mask, causal[2:5, :5])


def test_a_fused_step_the_kernel_declines_leaves_the_cache_untouched():
    cache = KVCache(1, 2, 8, 16, torch.device("cpu"), torch.float32)  # float32: not for the bf16 kernel
    qkv = torch.randn(1, 1, 2 * 3 * 16)
    assert cache.fused_decode(qkv, torch.ones(1, 8), torch.zeros(1, 8), torch.tensor([0]), 2, 8, 0.25) is None
    assert not cache.k.any() and not cache.v.any()


def test_a_one_token_step_turns_onednn_off_only_around_pytorchs_matmuls(monkeypatch):
    """Without our kernels, a one-token step's products and attention run with oneDNN off (see
    gemv.onednn_disabled); the rest of that forward (norms, ...) and a prefill with it on: a process-wide switch
    is flipped no wider than it needs to be."""
    model = _tiny_gpt(torch.bfloat16)
    for op in ("linear_bf16", "attend_one", "attend_decode", "layer_norm", "decode_blocks"):
        monkeypatch.setattr(gemv, op, lambda *args: None)  # as where gemv.c cannot be built
    seen = {"linear": [], "attention": [], "norm": []}

    def recording(name, fn):
        def call(*args, **kwargs):
            seen[name].append(torch.backends.mkldnn.enabled)
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(F, "linear", recording("linear", F.linear))
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording("attention", F.scaled_dot_product_attention))
    model.transformer.ln_f.register_forward_pre_hook(lambda *args: seen["norm"].append(torch.backends.mkldnn.enabled))
    model.set_kv_cache(1)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), torch.arange(3))
        prefill = {name: calls[:] for name, calls in seen.items()}
        model(torch.tensor([[4]]), torch.tensor([3]))
    assert all(prefill["linear"] + prefill["attention"] + prefill["norm"])
    decode = {name: calls[len(prefill[name]):] for name, calls in seen.items()}
    assert decode["linear"] == [False] * 5 and decode["attention"] == [False] and decode["norm"] == [True]
    assert torch.backends.mkldnn.enabled
