"""The later Phi family (Phi-3, Phi-3.5, Phi-4-mini, phi-4): our GPT with the sequential block against transformers'
Phi3ForCausalLM number for number (random tiny configs: multi-head and grouped-query, full and partial rotary, tied
and untied, with and without longrope and a sliding window), conversion both ways, the configs, longrope through the
KV cache, and the CPU kernels, quantization and compilation on the new block."""

import json
import math
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from hf_checkpoints import hf_state_dict, hub_phi3_config_json, make_hf_checkpoint, save_weights, tiny_phi3_config
from kernel_checks import BUILDABLE, Spy, needs_kernels
from lit_gpt import gemv
from lit_gpt.config import PHI_MODEL_TYPES, Config, configs
from lit_gpt.convert import convert_hf_checkpoint, convert_lit_checkpoint
from lit_gpt.generate import compile_decode, generate_tokens
from lit_gpt.load import load_model
from lit_gpt.model import GPT
from lit_gpt.utils import UserError

ORIGINAL = 16  # original_max_position_embeddings of the longrope configs (their context: 64)

# tiny_phi3_config's arguments. Head sizes 16 and 32; rotary dims 12, 8, 16 and 32; the window shorter than the
# original context in one, longer in another
SHAPES = {
    "gqa-partial0.75-tied-longrope-window": dict(n_embd=96, n_head=6, n_kv_heads=2, rotary=0.75, tied=True,
                                                 longrope=ORIGINAL, sliding_window=11),
    "mha-full-untied": dict(n_embd=64, n_head=4),
    "mqa-full-untied-longrope": dict(n_embd=64, n_head=4, n_kv_heads=1, longrope=ORIGINAL),
    "mha-partial0.5-window": dict(n_embd=64, n_head=4, rotary=0.5, sliding_window=7),
    "gqa-tied-theta250k-window": dict(n_embd=128, n_head=4, n_kv_heads=2, tied=True, rope_theta=250000.0,
                                      sliding_window=23),
}
PARAMS = [pytest.param(name, marks=() if i == 0 else pytest.mark.slow) for i, name in enumerate(SHAPES)]

pytestmark = pytest.mark.usefixtures("one_thread")


def lively(hf) -> None:
    """Weights that make the next token depend on the context (x3, the logits x5 more: through the final norm, which
    leaves a tied embedding as it is), so that greedy comparisons say something."""
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(3)
        hf.model.norm.weight.mul_(5)


def converted_pair(d, shape: str, lively_weights: bool = False):
    """transformers' model of a random checkpoint of SHAPES[shape] in `d`, and ours converted from it."""
    hf = make_hf_checkpoint(d, tiny_phi3_config(**SHAPES[shape]), scheme="phi3", tokenizer=False)
    if lively_weights:
        lively(hf)
        save_weights(hf_state_dict(hf, "phi3"), d, "safetensors", 1)
    convert_hf_checkpoint(d, show_progress=False)
    return hf, load_model(d)


@pytest.fixture(scope="module", params=PARAMS)
def pair(request, tmp_path_factory):
    return (*converted_pair(tmp_path_factory.mktemp("phi3"), request.param), request.param)


def hf_last_logits(hf, idx: torch.Tensor, ends) -> torch.Tensor:
    """transformers' logits at position end - 1 of a forward over idx[:, :end], for each end: with longrope the
    factors depend on the length of the sequence so far, as they do in a generation."""
    with torch.no_grad():
        return torch.stack([hf(idx[:, :end]).logits[:, -1] for end in ends], dim=1)


# ---------------------------------------------------------------------------------------------- against transformers


@pytest.mark.parametrize("length", [1, 9, ORIGINAL, ORIGINAL + 1, 40, 64])
def test_full_forward_matches_transformers(pair, length):
    """Up to and past the sliding window and original_max_position_embeddings, to the whole context."""
    hf, ours, _ = pair
    idx = torch.randint(0, 256, (2, length))
    with torch.no_grad():
        expected = hf(idx).logits
        actual = ours(idx)
    assert actual.shape == expected.shape == (2, length, 256)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prompt_len", [1, 5])
def test_kv_cache_token_by_token_matches_transformers(pair, prompt_len):
    """Every step's logits are transformers' for the sequence so far, across original_max_position_embeddings
    (longrope switches the factors of the whole sequence there) and the sliding window."""
    hf, ours, _ = pair
    total = 30
    idx = torch.randint(0, 256, (2, total))
    ours.set_kv_cache(batch_size=2, max_seq_length=48)
    with torch.no_grad():
        steps = [ours(idx[:, :prompt_len], torch.arange(prompt_len))[:, -1]]
        steps += [ours(idx[:, t:t + 1], torch.tensor([t]))[:, -1] for t in range(prompt_len, total)]
    expected = hf_last_logits(hf, idx, range(prompt_len, total + 1))
    torch.testing.assert_close(torch.stack(steps, dim=1), expected, atol=1e-5, rtol=0)


def test_a_prefill_that_crosses_the_original_length_sees_the_whole_sequence(pair):
    """A chat turn prefilled on top of a short history, ending past original_max_position_embeddings: its logits are
    those of one forward over the whole sequence (the history is computed again with the long factors)."""
    hf, ours, _ = pair
    idx = torch.randint(0, 256, (1, 30))
    ours.set_kv_cache(batch_size=1, max_seq_length=48)
    with torch.no_grad():
        ours(idx[:, :10], torch.arange(10))
        second = ours(idx[:, 10:], torch.arange(10, 30))
        expected = hf(idx).logits[:, 10:]
    torch.testing.assert_close(second, expected, atol=1e-5, rtol=0)
    assert ours.long_rope == ours.config.longrope


def test_a_conversation_cut_back_below_the_original_length(pair):
    """Continuing at a position below original_max_position_embeddings after the cache held a longer sequence (as
    chat does after an interrupted reply): the factors are the short ones again, for the kept history too."""
    hf, ours, _ = pair
    idx = torch.randint(0, 256, (1, 24))
    new = torch.randint(0, 256, (1, 4))
    ours.set_kv_cache(batch_size=1, max_seq_length=48)
    with torch.no_grad():
        ours(idx, torch.arange(24))
        actual = ours(new, torch.arange(8, 12))
        expected = hf(torch.cat((idx[:, :8], new), dim=1)).logits[:, 8:]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prompt_len", [3, 20])
def test_greedy_generation_matches_transformers_generate(pair, prompt_len, tmp_path):
    """Greedy tokens equal transformers' generate, a generation that grows past original_max_position_embeddings
    included (transformers' generate drops its cache there and processes the sequence again, as we do)."""
    hf, ours = converted_pair(tmp_path, pair[2], lively_weights=True)
    prompt = torch.randint(0, 256, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len))
    n = 40 - prompt_len
    tokens = torch.stack(list(generate_tokens(ours, prompt, prompt_len + n, temperature=0.0)), dim=1)
    hf.generation_config.eos_token_id = None  # no stopping, and no suppressing eos until some minimum length
    with torch.no_grad():
        expected = hf.generate(prompt[None], attention_mask=torch.ones(1, prompt_len, dtype=torch.long),
                               do_sample=False, max_new_tokens=n, pad_token_id=2)
    assert tokens.tolist() == expected[:, prompt_len:].tolist()
    assert len(set(tokens.flatten().tolist())) >= 2  # lively: the next token depends on the context


# ---------------------------------------------------------------------------------------------- conversion, configs


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["gqa-partial0.75-tied-longrope-window", "mqa-full-untied-longrope"])
def test_hf_lit_hf_round_trip_is_bit_exact(tmp_path, shape):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    src, out = tmp_path / "src", tmp_path / "out"
    hf = make_hf_checkpoint(src, tiny_phi3_config(**SHAPES[shape]), scheme="phi3", shards=2, tokenizer=False)
    convert_hf_checkpoint(src, show_progress=False)
    convert_lit_checkpoint(src, out)
    original = hf_state_dict(hf, "phi3")
    written = load_file(out / "model.safetensors")
    assert set(written) == set(original)
    assert all(written[name].dtype == t.dtype and torch.equal(written[name], t) for name, t in original.items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning about the checkpoint fails the test
        reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.config.sliding_window == hf.config.sliding_window
    assert reloaded.config.rope_parameters["rope_type"] == "longrope"
    idx = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(idx).logits, hf(idx).logits)


def test_tied_checkpoint_with_the_head_saved_too_converts(tmp_path):
    """Some exports of tied models hold lm_head.weight as well; transformers ties it to the embedding regardless."""
    config = tiny_phi3_config(**SHAPES["gqa-partial0.75-tied-longrope-window"])
    hf = make_hf_checkpoint(tmp_path, config, scheme="phi3", tokenizer=False)
    sd = hf_state_dict(hf, "phi3")
    save_weights({**sd, "lm_head.weight": sd["model.embed_tokens.weight"].clone()}, tmp_path, "safetensors", 1)
    convert_hf_checkpoint(tmp_path, show_progress=False)
    saved = torch.load(tmp_path / "lit_model.pth", weights_only=True)
    assert "lm_head.weight" not in saved  # held once, as the embedding
    model = load_model(tmp_path)
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-5, rtol=0)


def _phi3_config_of(named: Config):
    """transformers' Phi3Config of a named config's values (the Hub's keys)."""
    from transformers import Phi3Config

    rope = None
    if named.longrope:
        rope = {"type": "longrope", "short_factor": named.rope_short_factor, "long_factor": named.rope_long_factor}
    return Phi3Config(
        vocab_size=named.padded_vocab_size, hidden_size=named.n_embd, intermediate_size=named.intermediate_size,
        num_hidden_layers=named.n_layer, num_attention_heads=named.n_head, num_key_value_heads=named.n_query_groups,
        max_position_embeddings=named.block_size, original_max_position_embeddings=named.rope_original_max_seq_len
        or named.block_size, partial_rotary_factor=named.rotary_percentage, rope_theta=float(named.rope_base),
        rope_scaling=rope, sliding_window=named.sliding_window or 262144, tie_word_embeddings=named.tie_embeddings,
        pad_token_id=0,
    )


@pytest.mark.parametrize("form", ["transformers-5", "hub"])
@pytest.mark.parametrize("name", [c["name"] for c in configs if c.get("parallel_residual") is False])
def test_config_json_gives_the_named_config(tmp_path, name, form):
    """Both forms of config.json (transformers 5's rope_parameters, the Hub's rope_scaling and top-level keys) give
    the named config; a window of the 128k models' 262144 positions, longer than the context, is none."""
    named = Config.from_name(name)
    hf = _phi3_config_of(named)
    data = hf.to_dict() if form == "transformers-5" else hub_phi3_config_json(hf)
    (tmp_path / "config.json").write_text(json.dumps({**data, "_name_or_path": f"microsoft/{name}"}, default=str))
    derived = Config.from_hf_config(tmp_path / "config.json")
    assert derived == Config.from_name(name, hf_config={})


def test_phi4_mini_config_json_as_published(tmp_path):
    """microsoft/Phi-4-mini-instruct's config.json (the keys that matter, and remote-code ones transformers ignores)."""
    named = Config.from_name("Phi-4-mini-instruct")
    published = {
        "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 199999,
        "embd_pdrop": 0.0, "eos_token_id": 199999, "full_attn_mod": 1, "hidden_act": "silu", "hidden_size": 3072,
        "initializer_range": 0.02, "intermediate_size": 8192, "interpolate_factor": 1, "lm_head_bias": False,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "phi3", "num_attention_heads": 24,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "original_max_position_embeddings": 4096,
        "pad_token_id": 199999, "partial_rotary_factor": 0.75, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": named.rope_long_factor, "short_factor": named.rope_short_factor,
                         "type": "longrope"},
        "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0", "use_cache": True, "vocab_size": 200064,
    }
    (tmp_path / "config.json").write_text(json.dumps(published))
    derived = Config.from_hf_config(tmp_path / "config.json")
    assert (derived.head_size, derived.rope_n_elem, derived.n_query_groups) == (128, 96, 8) and derived.tie_embeddings
    assert derived == replace(named, name=tmp_path.name, hf_config={})
    assert round(derived.longrope_scale, 6) == 1.190238  # sqrt(1 + ln(131072 / 4096) / ln(4096))


def test_longrope_attention_factor_from_the_config(tmp_path):
    """rope_scaling's attention_factor is taken as it is; a `factor` gives the default formula its ratio."""
    base = hub_phi3_config_json(tiny_phi3_config(longrope=ORIGINAL))
    by_factor = math.sqrt(1 + math.log(2) / math.log(ORIGINAL))
    for extra, expected in (({"attention_factor": 1.5}, 1.5), ({"factor": 2.0}, by_factor)):
        (tmp_path / "config.json").write_text(json.dumps({**base, "rope_scaling": {**base["rope_scaling"], **extra}}))
        assert Config.from_hf_config(tmp_path / "config.json").longrope_scale == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("changes", "needle"), [
    (dict(hidden_act="gelu"), "activation 'gelu' is not supported (phi3 uses silu)"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), 'rope type "dynamic" is not supported'),
    (dict(rope_scaling={"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 8}),
     "rope_short_factor holds 3 factors; the 16 rotary dims need 8"),
    (dict(rope_scaling={"type": "su", "short_factor": [1.0] * 8, "long_factor": ["x"] * 8}),
     'the longrope long_factor is ["x", "x"'),
    (dict(sliding_window=0), "sliding_window is 0, not a positive integer"),
    (dict(tie_word_embeddings="yes"), 'tie_word_embeddings is "yes", not true or false'),
    (dict(num_key_value_heads=3), "num_attention_heads 4 is not divisible by num_key_value_heads 3"),
    (dict(intermediate_size=None), "lacks the key 'intermediate_size'"),
])
def test_phi3_config_json_with_wrong_values_is_one_clear_error(tmp_path, changes, needle):
    data = {**hub_phi3_config_json(tiny_phi3_config()), **changes}
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    with pytest.raises(UserError) as info:
        Config.from_hf_config(tmp_path / "config.json")
    assert needle in str(info.value) and "config.json" in str(info.value)
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("name", [c["name"] for c in configs])
def test_lit_config_json_round_trip(tmp_path, name):
    config = Config.from_name(name)
    config.to_json(tmp_path / "lit_config.json")
    assert Config.from_json(tmp_path / "lit_config.json") == config


def test_weights_of_the_other_block_are_named(tmp_path):
    make_hf_checkpoint(tmp_path, tiny_phi3_config(), scheme="phi3", tokenizer=False)
    with pytest.raises(UserError, match=r"named as in phi3 checkpoints, but the named config phi-2 describes "
                                        r"Phi-1/1.5/2's block"):
        convert_hf_checkpoint(tmp_path, model_name="phi-2", show_progress=False)


def test_download_takes_phi3_repos():
    from lit_gpt.download import SUPPORTED_REPO_IDS

    assert "phi3" in PHI_MODEL_TYPES
    assert {"microsoft/Phi-3-mini-4k-instruct", "microsoft/Phi-3-mini-128k-instruct", "microsoft/Phi-3.5-mini-instruct",
            "microsoft/Phi-3-medium-4k-instruct", "microsoft/Phi-4-mini-instruct", "microsoft/phi-4"
            } <= set(SUPPORTED_REPO_IDS)


# ---------------------------------------------------------------------------------------------- kernels, quantization


def _small(name: str = "Phi-4-mini-instruct", **overrides) -> Config:
    """A named config of the later family, shrunk: 2 layers, context 64, vocabulary 512; longrope with original
    length ORIGINAL and factors of the right count."""
    base = Config.from_name(name)
    shape = dict(n_layer=2, n_embd=256, n_head=4, n_query_groups=2, intermediate_size=512, block_size=64,
                 vocab_size=512, padded_vocab_size=512, sliding_window=None)
    shape.update(overrides)
    config = Config.from_name(name, **{**shape, "rope_short_factor": None, "rope_long_factor": None,
                                        "rope_original_max_seq_len": None})
    if base.longrope:
        half = config.rope_n_elem // 2
        config = Config.from_name(name, **shape, rope_original_max_seq_len=ORIGINAL,
                                  rope_short_factor=[1.0 + 0.05 * i for i in range(half)],
                                  rope_long_factor=[1.0 + 0.7 * i for i in range(half)])
    return config


def _bf16_model(config: Config) -> GPT:
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.06)
    return model.to(torch.bfloat16).eval()


def _decode(model: GPT, idx: torch.Tensor, prefill: int = 5, cache: int = 48) -> tuple[torch.Tensor, list]:
    """The last-position logits of a prefill, then of each later token decoded one by one; and the caches."""
    model.set_kv_cache(idx.size(0), cache)
    with torch.inference_mode():
        steps = [model(idx[:, :prefill], torch.arange(prefill))[:, -1]]
        steps += [model(idx[:, i:i + 1], torch.tensor([i]))[:, -1] for i in range(prefill, idx.size(1))]
    caches = [t.clone() for b in model.transformer.h for t in (b.attn.kv_cache.k, b.attn.kv_cache.v)]
    return torch.stack(steps, dim=1), caches


@needs_kernels
@pytest.mark.parametrize(("n_head", "n_groups", "head_size", "length", "window"),
                         [(4, 4, 96, 30, 7), (24, 8, 128, 40, 11), (8, 2, 64, 5, 11), (4, 1, 32, 20, 1)])
def test_attention_kernel_with_a_sliding_window_matches_float32(n_head, n_groups, head_size, length, window):
    torch.manual_seed(length)
    q = torch.randn(2, n_head, 1, head_size).to(torch.bfloat16)
    k, v = (torch.randn(2, n_groups, 48, head_size).to(torch.bfloat16) for _ in range(2))
    y = gemv.attend_one(q, k, v, torch.tensor([length - 1]), head_size ** -0.5, window)
    start = max(0, length - window)
    ref = F.scaled_dot_product_attention(q.float(), k[:, :, start:length].float(), v[:, :, start:length].float(),
                                         scale=head_size ** -0.5, enable_gqa=n_head != n_groups)
    assert (y.float() - ref).abs().max().item() <= 8e-3 * ref.abs().max().item()


@needs_kernels
@pytest.mark.parametrize("name", ["Phi-4-mini-instruct", "Phi-3-mini-4k-instruct"])
def test_fused_decode_on_the_new_block_equals_the_pytorch_ops_bit_for_bit(monkeypatch, name):
    """attend_decode (rotary embedding, cache write, attention in one call) on the later family's block (grouped
    queries, partial rotary, a sliding window, longrope across its switch) computes what the PyTorch ops around
    attend_one compute: the same logits and caches, to the bit."""
    config = _small(name, sliding_window=11)
    model = _bf16_model(config)
    idx = torch.randint(0, 512, (2, 30))
    monkeypatch.setattr(gemv, "decode_blocks", lambda *args: None)  # the blocks' calls one by one
    fused = Spy(monkeypatch, "attend_decode")
    logits, caches = _decode(model, idx)
    assert fused.calls == 25 * 2  # every decode step took the kernel
    monkeypatch.setattr(gemv, "attend_decode", lambda *args: None)  # declined: the PyTorch ops, then attend_one
    separate = Spy(monkeypatch, "attend_one")
    logits_ref, caches_ref = _decode(model, idx)
    assert separate.calls == 25 * 2
    assert torch.equal(logits, logits_ref)
    assert all(torch.equal(a, b) for a, b in zip(caches, caches_ref))


@pytest.mark.parametrize("name", ["Phi-4-mini-instruct", "phi-4"])
def test_bf16_decode_matches_the_full_forwards(name, monkeypatch):
    """Through the kernels where they build (else PyTorch), bf16 decode steps agree with forwards over each prefix."""
    config = _small(name, sliding_window=11)
    model = _bf16_model(config)
    idx = torch.randint(0, 512, (1, 30))
    spies = [Spy(monkeypatch, "linear_bf16"), Spy(monkeypatch, "decode_blocks")]
    logits, _ = _decode(model, idx)
    if BUILDABLE:  # every product of the 5-token prefill took the kernels, every step the blocks' (and the LM head's)
        assert spies[0].calls == 4 * 2 + 1 + 25 and spies[1].calls == 25
    with torch.inference_mode():
        full = torch.stack([model(idx[:, :end])[:, -1] for end in range(5, 31)], dim=1).float()
    assert (logits.float() - full).abs().max().item() <= 0.03 * full.abs().max().item()


@needs_kernels
@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("name", ["Phi-4-mini-instruct", "Phi-3-mini-4k-instruct"])
def test_the_new_blocks_in_one_call_equal_their_calls_one_by_one_bit_for_bit(monkeypatch, name, mode):
    """gemv.decode_blocks on the later family's sequential blocks (RMS norms, grouped-query attention with partial
    rotary, a sliding window, longrope across its switch, SwiGLU) computes what the blocks' calls one by one compute
    (rms_norm, the products, attend_decode, silu_mul, the residual sums): the same logits and caches, to the bit; for
    one sequence and for two."""
    from lit_gpt.quantize import quantize_model

    model = _bf16_model(_small(name, sliding_window=11))
    if mode != "bf16":
        quantize_model(model, mode)
    idx = torch.randint(0, 512, (2, 30))

    def decode():
        one, caches = _decode(model, idx[:1])
        two, caches_two = _decode(model, idx)
        return one, two, caches + caches_two

    fused = Spy(monkeypatch, "decode_blocks")
    one, two, caches = decode()
    assert fused.calls == 25 + 25
    monkeypatch.setattr(gemv, "decode_blocks", lambda *args: None)
    one_ref, two_ref, caches_ref = decode()
    assert torch.equal(one, one_ref) and torch.equal(two, two_ref)
    assert all(torch.equal(a, b) for a, b in zip(caches, caches_ref))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_new_block_through_load_and_saved(tmp_path, mode, monkeypatch):
    """int8 / int4 at load on the later family's block (no biases, a tied head quantized while the embedding
    stays), close to bf16; and saved once (scripts/quantize.py), loaded again to the same logits."""
    from lit_gpt.quantized_checkpoint import save_quantized
    from lit_gpt.random_checkpoint import write_random_hf_checkpoint

    config = _small(sliding_window=11)
    write_random_hf_checkpoint(tmp_path, config=config, shards=1)
    convert_hf_checkpoint(tmp_path, dtype="bfloat16", show_progress=False)
    bf16 = load_model(tmp_path)
    spies = [Spy(monkeypatch, f"linear_{mode}"), Spy(monkeypatch, "decode_blocks")]
    quantized = load_model(tmp_path, quantize=mode, use_saved=False)
    assert type(quantized.lm_head).__name__ == ("Int8Linear" if mode == "int8" else "Int4Linear")
    assert quantized.transformer.wte.weight.dtype == torch.bfloat16
    idx = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(0))
    ours, _ = _decode(quantized, idx)
    reference, _ = _decode(bf16, idx)
    # (symmetric int4, as q4_0, errs ~10% more than a scale and a zero per group on these random weights)
    similarity = F.cosine_similarity(ours.float().flatten(), reference.float().flatten(), dim=0)
    assert similarity > (0.99 if mode == "int8" else 0.97), similarity
    if BUILDABLE:  # each step (the quantized model's, and bf16's) through the blocks' kernel and the LM head's product;
        # the products also take the 5-token prefill and the cache's recomputation at longrope's switch (16 rows)
        assert spies[0].calls == 25 + (4 * 2 + 1) + 4 * 2 and spies[1].calls == 2 * 25
    save_quantized(quantized, tmp_path, show_progress=False)
    again, _ = _decode(load_model(tmp_path, quantize=mode), idx)
    assert torch.equal(again, ours)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_gives_the_eager_logits_across_the_longrope_switch(dtype):
    """Under torch.compile the host-side steps (longrope's switch, computing the cache again) stay eager: a
    generation past original_max_position_embeddings and the sliding window gives eager's tokens and, with our
    kernels in bf16, eager's logits to the bit."""
    config = _small(sliding_window=11)
    model = _bf16_model(config).to(dtype)
    prompt = torch.randint(0, 512, (6,))

    def decode(forward):
        logits = []

        def step(idx, input_pos):
            logits.append(forward(idx, input_pos))
            return logits[-1]

        tokens = torch.stack(list(generate_tokens(model, prompt, 40, temperature=0.0, decode_forward=step)), dim=1)
        return tokens, torch.cat(logits)

    eager, eager_logits = decode(model)
    ours, logits = decode(compile_decode(model))
    assert ours.tolist() == eager.tolist()
    if dtype == torch.bfloat16 and gemv.available():  # inductor rounds as eager does, around the same kernels
        assert torch.equal(logits, eager_logits)
    else:  # inductor's own fused float ops sum in another order
        torch.testing.assert_close(logits, eager_logits, atol=1e-4 if dtype == torch.float32 else 0.05, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["Phi-3-mini-4k-instruct", "Phi-4-mini-instruct", "phi-4"])
def test_random_checkpoint_of_the_new_shapes_loads_in_transformers(tmp_path, name):
    """benchmark --make_random's checkpoints of the new shapes (fewer layers): the Hub's layout, transformers reads
    them, and our model computes its logits; the tokenizer fits the vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_gpt.random_checkpoint import write_random_hf_checkpoint
    from lit_gpt.tokenizer import Tokenizer

    narrow = dict(n_layer=2, n_embd=2 * Config.from_name(name).head_size, n_head=2, n_query_groups=1,
                  intermediate_size=256)  # the head, the rotary dims and the vocabulary of the real shape
    config = Config.from_name(name, **narrow)
    write_random_hf_checkpoint(tmp_path, config=config, shards=2, dtype=torch.float32)
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    convert_hf_checkpoint(tmp_path, show_progress=False)
    ours = load_model(tmp_path)
    text = 'def print_prime(n):\n    """Print all primes"""\n'
    ids = Tokenizer(tmp_path).encode(text)
    assert ids.tolist() == AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"]
    assert int(ids.max()) < config.padded_vocab_size
    with torch.no_grad():
        torch.testing.assert_close(ours(ids[None]), hf.eval()(ids[None]).logits, atol=1e-4, rtol=0)


def test_random_checkpoint_in_our_format_only(tmp_path):
    """benchmark --make_random with --transformers False: lit_model.pth and the tokenizer, no Hub files (phi-4's
    shape in bf16 then takes 29 GB of disk instead of 58)."""
    from lit_gpt.random_checkpoint import write_random_lit_checkpoint
    from lit_gpt.tokenizer import Tokenizer

    config = _small("phi-4", padded_vocab_size=100352, vocab_size=100352)
    write_random_lit_checkpoint(tmp_path, config=config)
    assert not list(tmp_path.glob("*.safetensors")) and not (tmp_path / "config.json").exists()
    model = load_model(tmp_path, quantize="int4", use_saved=False)
    ids = Tokenizer(tmp_path).encode("def f(x):\n    return x\n")
    with torch.inference_mode():
        assert model(ids[None]).shape == (1, len(ids), 100352)
