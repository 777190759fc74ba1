"""lit-gpt and litgpt interop: our lit_config.json and lit_model.pth load there as the same model, theirs load here,
and `model.max_seq_length` sizes the KV cache as lit-gpt's scripts expect.

Current litgpt (PyPI `litgpt`) is an optional test dependency and not in the test extra: its requirements pin
huggingface-hub<1.4 and jsonargparse<=4.41, which conflict with ours. Its config and model modules need only
psutil besides what we have: `pip install --no-deps litgpt psutil` runs the tests that use it.
"""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from hf_checkpoints import make_hf_checkpoint, tiny_hf_config
from lit_gpt.config import Config
from lit_gpt.convert import convert_hf_checkpoint
from lit_gpt.load import load_model
from lit_gpt.model import GPT
from lit_gpt.utils import NeedsStep, UserError

ROOT = Path(__file__).resolve().parent.parent

# The fields of lit-gpt's Config at the Phi tutorial's commit (Lightning-AI/lit-gpt 74b8df0, lit_gpt/config.py,
# December 2023). Its Config.from_json is Config(**json), so a file with any other key fails to load. head_size is
# not among them: __post_init__ computed it from n_embd // n_head, and it became a field with Gemma (2024; litgpt
# 0.1.0.dev1 on PyPI has it, and scale_embeddings). n_expert and n_expert_per_token (Mixtral, December 2023) are left
# out as they may postdate that commit; we write neither.
LIT_GPT_74B8DF0_FIELDS = {
    "name", "hf_config", "block_size", "vocab_size", "padding_multiple", "padded_vocab_size", "n_layer", "n_head",
    "n_embd", "rotary_percentage", "parallel_residual", "bias", "lm_head_bias", "n_query_groups",
    "shared_attention_norm", "_norm_class", "norm_eps", "_mlp_class", "gelu_approximate", "intermediate_size",
    "rope_condense_ratio", "rope_base",
}
# What that Config must be given to build Phi: the sizes, and where lit-gpt's defaults (block_size 4096,
# rotary_percentage 0.25, lm_head_bias false, shared_attention_norm false, gelu_approximate "none", ...) are not Phi's.
# _norm_class and _mlp_class default to Phi's LayerNorm and GptNeoxMLP (litgpt spells them norm_class_name and
# mlp_class_name, so neither spelling could be written for both).
PHI_NEEDS = {
    "block_size", "vocab_size", "padded_vocab_size", "n_layer", "n_head", "n_embd", "rotary_percentage",
    "parallel_residual", "bias", "lm_head_bias", "n_query_groups", "shared_attention_norm", "norm_eps",
    "gelu_approximate", "intermediate_size", "rope_base",
}
PHI_BLOCK = {"parallel_residual": True, "shared_attention_norm": True, "gelu_approximate": "tanh"}


def converted(d: Path, **shape) -> Path:
    make_hf_checkpoint(d, tiny_hf_config(**shape), tokenizer=False)
    convert_hf_checkpoint(d, show_progress=False)
    return d


def litgpt_model(config_path: Path, state_dict: dict):
    """litgpt's own GPT, configured by litgpt from `config_path`, with `state_dict` loaded strictly."""
    pytest.importorskip("litgpt", reason="pip install --no-deps litgpt psutil")
    from litgpt.config import Config as LitgptConfig
    from litgpt.model import GPT as LitgptGPT

    model = LitgptGPT(LitgptConfig.from_file(config_path))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------- lit_config.json


@pytest.mark.parametrize("name", ["phi-1", "phi-1_5", "phi-2"])
def test_lit_config_json_has_only_keys_lit_gpt_74b8df0_accepts_and_all_phi_needs(tmp_path, name):
    config = Config.from_name(name)
    config.to_json(tmp_path / "lit_config.json")
    data = json.loads((tmp_path / "lit_config.json").read_text())
    assert set(data) <= LIT_GPT_74B8DF0_FIELDS, set(data) - LIT_GPT_74B8DF0_FIELDS
    assert PHI_NEEDS <= set(data), PHI_NEEDS - set(data)
    assert {k: data[k] for k in PHI_BLOCK} == PHI_BLOCK
    assert data["n_embd"] // data["n_head"] == config.head_size  # what lit-gpt derives instead of reading it
    assert Config.from_json(tmp_path / "lit_config.json") == config


def test_converted_lit_config_json_keys(tmp_path):
    d = converted(tmp_path, n_embd=80, n_head=4, rotary=0.4, n_kv_heads=2)
    data = json.loads((d / "lit_config.json").read_text())
    assert PHI_NEEDS <= set(data) <= LIT_GPT_74B8DF0_FIELDS
    assert (data["n_query_groups"], data["rotary_percentage"]) == (2, 0.4)


def test_lit_config_json_written_by_an_older_lit_phi_still_loads(tmp_path):
    """Older versions wrote every field of our Config, head_size included, and none of the block keys."""
    config = Config.from_name("phi-2")
    (tmp_path / "lit_config.json").write_text(json.dumps(asdict(config)))
    assert "head_size" in asdict(config)
    assert Config.from_json(tmp_path / "lit_config.json") == config


def test_lit_config_json_of_lit_gpt_74b8df0_loads(tmp_path):
    """What lit-gpt's convert_hf_checkpoint wrote for phi-2 then: asdict of its Config (every field above)."""
    written = dict(name="phi-2", hf_config={"org": "microsoft", "name": "phi-2"}, block_size=2048, vocab_size=50257,
                   padding_multiple=512, padded_vocab_size=51200, n_layer=32, n_head=32, n_embd=2560,
                   rotary_percentage=0.4, parallel_residual=True, bias=True, lm_head_bias=True, n_query_groups=32,
                   shared_attention_norm=True, _norm_class="LayerNorm", norm_eps=1e-5, _mlp_class="GptNeoxMLP",
                   gelu_approximate="tanh", intermediate_size=10240, rope_condense_ratio=1, rope_base=10000)
    assert set(written) == LIT_GPT_74B8DF0_FIELDS
    (tmp_path / "lit_config.json").write_text(json.dumps(written))
    ours = Config.from_json(tmp_path / "lit_config.json")
    assert ours == Config.from_name("phi-2", vocab_size=50257)


@pytest.mark.parametrize(("key", "value"), [
    ("parallel_residual", False), ("shared_attention_norm", False), ("gelu_approximate", "none"),
    ("_mlp_class", "LLaMAMLP"), ("mlp_class_name", "LLaMAMoE"), ("norm_class_name", "RMSNorm"), ("n_expert", 8),
    ("sliding_window_size", 4096),
])
def test_lit_gpt_config_of_another_block_is_refused(tmp_path, key, value):
    config = Config.from_name("phi-2")
    config.to_json(tmp_path / "lit_config.json")
    data = json.loads((tmp_path / "lit_config.json").read_text())
    (tmp_path / "lit_config.json").write_text(json.dumps({**data, key: value}))
    with pytest.raises(UserError, match=key) as info:
        Config.from_json(tmp_path / "lit_config.json")
    assert not isinstance(info.value, NeedsStep)  # converting again would not make it a Phi model
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.slow
def test_lit_gpt_config_of_another_block_is_one_line_in_the_scripts(tmp_path):
    from test_convert import assert_one_line_error, run_script

    d = converted(tmp_path / "ckpt")
    data = json.loads((d / "lit_config.json").read_text())
    (d / "lit_config.json").write_text(json.dumps({**data, "parallel_residual": False}))
    proc = run_script("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", str(d), "--output_dir",
                      str(tmp_path / "out"))
    assert_one_line_error(proc, "parallel_residual", "lit_config.json")


def test_litgpt_config_loads_here(tmp_path):
    """A Phi config as current litgpt writes it (asdict of its Config: norm_class_name, mlp_class_name and many
    more keys of other architectures, all off)."""
    pytest.importorskip("litgpt", reason="pip install --no-deps litgpt psutil")
    from litgpt.config import Config as LitgptConfig

    theirs = LitgptConfig.from_name("phi-2")
    (tmp_path / "lit_config.json").write_text(json.dumps(asdict(theirs)))
    ours = Config.from_json(tmp_path / "lit_config.json")
    assert ours == Config.from_name("phi-2", vocab_size=theirs.vocab_size)
    assert ours.rope_n_elem == theirs.rope_n_elem


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("shape", [dict(), dict(n_embd=80, n_head=4, rotary=0.4, n_kv_heads=2)],
                         ids=["mha", "gqa-rotary-0.4"])
def test_our_checkpoint_loads_in_litgpt_with_the_same_logits(tmp_path, shape, one_thread):
    d = converted(tmp_path, **shape)
    theirs = litgpt_model(d / "lit_config.json", torch.load(d / "lit_model.pth", weights_only=True))
    assert theirs.config.shared_attention_norm and theirs.config.gelu_approximate == "tanh"
    ours = load_model(d)
    idx = torch.randint(0, 51200, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx), ours(idx), atol=1e-5, rtol=0)


def test_lit_gpt_finetune_checkpoint_loads(tmp_path, one_thread):
    """lit-gpt's fine-tuning scripts save {"model": state_dict, ...} (at 74b8df0 in our very layout)."""
    d = converted(tmp_path / "plain")
    wrapped = tmp_path / "finetuned"
    wrapped.mkdir()
    (wrapped / "lit_config.json").write_bytes((d / "lit_config.json").read_bytes())
    state_dict = torch.load(d / "lit_model.pth", weights_only=True)
    torch.save({"model": state_dict, "iter_num": 10, "step_count": 5}, wrapped / "lit_model.pth")
    idx = torch.randint(0, 51200, (1, 11))
    with torch.no_grad():
        assert torch.equal(load_model(wrapped)(idx), load_model(d)(idx))


def test_litgpt_finetune_checkpoint_and_config_load(tmp_path, one_thread):
    """A checkpoint litgpt saves as its fine-tuning does ({"model": ...}, its attn.qkv layout), with the config as
    litgpt has it, gives our model the same logits."""
    d = converted(tmp_path / "ours", n_embd=80, n_head=4, rotary=0.4, n_kv_heads=2)
    theirs = litgpt_model(d / "lit_config.json", torch.load(d / "lit_model.pth", weights_only=True))
    assert any(".attn.qkv." in name for name in theirs.state_dict())
    out = tmp_path / "theirs"
    out.mkdir()
    torch.save({"model": theirs.state_dict()}, out / "lit_model.pth")
    (out / "lit_config.json").write_text(json.dumps(asdict(theirs.config)))
    idx = torch.randint(0, 51200, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(idx), theirs(idx), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- max_seq_length


def _tiny_gpt() -> GPT:
    config = Config.from_name("phi-1_5", n_layer=2, n_embd=64, n_head=2, intermediate_size=128, block_size=64,
                              vocab_size=128, padded_vocab_size=128)
    return GPT(config).eval()


def _cache_lengths(model: GPT) -> set:
    return {None if b.attn.kv_cache is None else b.attn.kv_cache.k.size(2) for b in model.transformer.h}


def test_max_seq_length_set_before_set_kv_cache_sizes_the_cache(one_thread):
    """lit-gpt's generate does `model.max_seq_length = n; model.set_kv_cache(batch_size=1)`."""
    model = _tiny_gpt()
    assert model.max_seq_length == 64
    model.max_seq_length = 16
    model.set_kv_cache(batch_size=1)
    assert _cache_lengths(model) == {16} and model.max_seq_length == 16
    idx = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        steps = [model(idx[:, :4], torch.arange(4))] + [model(idx[:, t:t + 1], torch.tensor([t])) for t in range(4, 12)]
        torch.testing.assert_close(torch.cat(steps, dim=1), model(idx), atol=1e-5, rtol=0)

    model.set_kv_cache(1, max_seq_length=32)  # an explicit length sizes that one cache
    assert _cache_lengths(model) == {32} and model.max_seq_length == 32
    model.set_kv_cache(1)
    assert _cache_lengths(model) == {16}
    model.max_seq_length = 8  # a cache of another length is dropped, never read past its end
    assert _cache_lengths(model) == {None}
    with pytest.raises(ValueError, match="exceeds the model's context 64"):
        model.max_seq_length = 65
    assert model.max_seq_length == 8


def test_set_kv_cache_without_length_still_takes_the_whole_context():
    model = _tiny_gpt()
    model.set_kv_cache(1, max_seq_length=16)
    model.set_kv_cache(1)
    assert _cache_lengths(model) == {64} and model.max_seq_length == 64


def test_litgpt_sizes_its_cache_from_max_seq_length_like_ours(tmp_path):
    d = converted(tmp_path)
    theirs = litgpt_model(d / "lit_config.json", torch.load(d / "lit_model.pth", weights_only=True))
    ours = load_model(d)
    for model in (theirs, ours):
        model.max_seq_length = 24
        model.set_kv_cache(batch_size=1)
    assert {b.attn.kv_cache.k.size(2) for b in theirs.transformer.h} == _cache_lengths(ours) == {24}
