"""GGUF export of the later family (llama.cpp's phi3 architecture): the file's layout, llama.cpp's logits on our
export against ours (grouped-query attention, partial rotary, a tied head, longrope on both sides of its switch),
the quantized exports, and the family's real tokenizers (Phi-3's SentencePiece, phi-4's and Phi-4-mini's tiktoken
BPE) tokenized by llama.cpp as by us.

The llama.cpp tests need llama-cpp-python (the `bench` extra) and skip without it, as in tests/test_gguf.py."""

import ctypes
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize
from safetensors import safe_open

from hf_checkpoints import hf_state_dict, make_hf_checkpoint, save_weights, tiny_phi3_config
from test_family_tokenizers import GGUF, RANKS, TEXTS
from test_gguf import _detokenize, _fields, _greedy, _llama, _our_greedy
from lit_gpt.config import Config
from lit_gpt.convert import convert_hf_checkpoint
from lit_gpt.gguf_export import export_gguf, gguf_tensor_bytes
from lit_gpt.tokenizer import GENERATION_IDS, Tokenizer, write_phi3_tokenizer, write_tiktoken_tokenizer

VOCAB_SIZES = {"phi-3": 32064, "phi-4": 100352, "phi-4-mini": 200064}  # the models' embedding rows
ORIGINAL = 256  # longrope's original context below; llama.cpp rounds a context up to a multiple of 256
# Phi-4-mini's shape shrunk (8 heads of 16 in 2 groups, rotary over 12 of 16 dims, tied head, longrope) with a
# sliding window that llama.cpp reads but does not apply (it lies beyond the texts here)
SHAPE = dict(n_embd=128, n_head=8, n_kv_heads=2, rotary=0.75, tied=True, longrope=ORIGINAL, sliding_window=600,
             block_size=1024, intermediate_size=192)

pytestmark = pytest.mark.slow  # real vocabularies take 1-2 s to build, llama.cpp a few more


def _write_tokenizer(d: Path, family: str) -> None:
    if family == "phi-3":
        write_phi3_tokenizer(d, GGUF, chat_template="{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}"
                                                    "<|end|>\n{% endfor %}<|assistant|>\n")
    else:
        write_tiktoken_tokenizer(d, RANKS[family], family)
    (d / "generation_config.json").write_text(json.dumps(GENERATION_IDS[family]))


def _family_checkpoint(d: Path, family: str, **shape) -> Path:
    """A random checkpoint with the family's real tokenizer, converted; its weights made lively (tests/test_phi3.py)
    so that the next token depends on the context."""
    hf = make_hf_checkpoint(d, tiny_phi3_config(vocab_size=VOCAB_SIZES[family], **shape), scheme="phi3",
                            tokenizer=False)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(3)
        hf.model.norm.weight.mul_(5)
    save_weights(hf_state_dict(hf, "phi3"), d, "safetensors", 1)
    _write_tokenizer(d, family)
    convert_hf_checkpoint(d, show_progress=False)
    return d


@pytest.fixture(scope="module")
def phi3(tmp_path_factory) -> Path:
    return _family_checkpoint(tmp_path_factory.mktemp("phi-3"), "phi-3", **SHAPE)


@pytest.fixture(scope="module")
def exports(phi3, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {t: export_gguf(phi3, t, out / f"phi3-{t}.gguf", show_progress=False) for t in ("bf16", "q8_0", "q4_0")}


def test_export_has_llama_cpps_phi3_layout(phi3, exports):
    meta = _fields(GGUFReader(exports["bf16"]))
    config = Config.from_json(phi3 / "lit_config.json")
    assert meta["general.architecture"] == "phi3" and meta["general.file_type"] == 32  # MOSTLY_BF16
    assert {k: meta[f"phi3.{k}"] for k in ("context_length", "embedding_length", "feed_forward_length", "block_count",
                                           "attention.head_count", "attention.head_count_kv", "rope.dimension_count",
                                           "attention.sliding_window", "rope.scaling.original_context_length")} \
        == {"context_length": 1024, "embedding_length": 128, "feed_forward_length": 192, "block_count": 2,
            "attention.head_count": 8, "attention.head_count_kv": 2, "rope.dimension_count": 12,
            "attention.sliding_window": 600, "rope.scaling.original_context_length": ORIGINAL}
    assert meta["phi3.attention.layer_norm_rms_epsilon"] == pytest.approx(config.norm_eps)
    assert meta["phi3.rope.scaling.attn_factor"] == pytest.approx(config.longrope_scale)  # sqrt(1 + ln 4 / ln 256)
    assert meta["phi3.rope.freq_base"] == 10000.0
    # llama.cpp gives Phi-3's added tokens their rstrip by the model's name
    assert "phi-3" in meta["general.name"].lower()
    assert meta["tokenizer.chat_template"] == Tokenizer(phi3).chat_template

    reader = GGUFReader(exports["bf16"])
    tensors = {t.name: t for t in reader.tensors}
    # no biases, no output.weight (the head is the embedding), longrope's two factor sets
    assert sorted(tensors) == sorted(["token_embd.weight", "output_norm.weight", "rope_factors_long.weight",
                                      "rope_factors_short.weight"] + [
        f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm",
                                                          "ffn_up", "ffn_down")])
    for kind in ("long", "short"):
        factors = np.array(tensors[f"rope_factors_{kind}.weight"].data)
        assert factors.dtype == np.float32 and factors.tolist() == pytest.approx(getattr(config, f"rope_{kind}_factor"))
    # the weights are the Hub-format file's, bit for bit: [q; k; v] and [gate; up] as transformers fuses them
    with safe_open(phi3 / "model.safetensors", "pt") as hf:
        def bf16(name):
            t = tensors[name]
            assert t.tensor_type == GGMLQuantizationType.BF16
            return torch.from_numpy(np.array(t.data)).view(torch.bfloat16).reshape(*reversed(t.shape.tolist()))

        for ours, theirs in (("blk.1.attn_qkv", "model.layers.1.self_attn.qkv_proj"),
                             ("blk.1.ffn_up", "model.layers.1.mlp.gate_up_proj"),
                             ("blk.0.attn_output", "model.layers.0.self_attn.o_proj"),
                             ("token_embd", "model.embed_tokens")):
            assert torch.equal(bf16(f"{ours}.weight"), hf.get_tensor(f"{theirs}.weight").to(torch.bfloat16)), ours
        assert torch.equal(torch.from_numpy(np.array(tensors["blk.1.ffn_norm.weight"].data)),
                           hf.get_tensor("model.layers.1.post_attention_layernorm.weight"))

    for gguf_type in ("q8_0", "q4_0"):
        reader = GGUFReader(exports[gguf_type])
        assert sum(int(t.n_bytes) for t in reader.tensors) == sum(gguf_tensor_bytes(config, gguf_type).values())


def test_phi3_sentencepiece_vocabulary_as_llama_cpp_has_it(phi3, exports):
    """Tokens, types and bos/eos/unk as llama.cpp's own ggml-vocab-phi-3.gguf (our tokenizer was built from it), and
    scores that order every merged piece as the original scores do."""
    from lit_gpt.tokenizer import _read_gguf_vocab

    meta = _fields(GGUFReader(exports["bf16"]))
    tokens, scores, types = _read_gguf_vocab(GGUF)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.pre"] == "default"
    assert meta["tokenizer.ggml.tokens"][:32011] == tokens[:32011]  # the rest is padding in both
    ours = meta["tokenizer.ggml.token_type"]
    assert ours[:32011] == types[:32011] and set(ours[32011:]) == {5}  # UNUSED padding
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.unknown_token_id"]) == (1, 32000, 0)
    assert meta["tokenizer.ggml.add_bos_token"] is False
    merged = [i for i in range(259, 32000) if scores[i] > -1e9 and len(tokens[i]) > 1]  # not the runs of spaces
    ours = meta["tokenizer.ggml.scores"]
    assert sorted(merged, key=lambda i: -ours[i]) == sorted(merged, key=lambda i: -scores[i])


def _real_ids(tokenizer: Tokenizer, count: int) -> list[int]:
    """The first `count` ids of real text (this Python's os module)."""
    ids = tokenizer.encode(Path(os.__file__).read_text(encoding="utf-8")).tolist()
    assert len(ids) >= count
    return ids[:count]


def _our_logits(checkpoint: Path, ids: list[int], gguf_type: str) -> np.ndarray:
    """Ours in float32 on the weights the export holds: rounded to bf16, or quantized to q8_0 / q4_0 and back (each
    row in blocks of 32, so our order of the rows changes nothing)."""
    from lit_gpt.load import load_model

    model = load_model(checkpoint, dtype=torch.float32)
    qtype = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}.get(gguf_type)
    with torch.no_grad():
        for p in model.parameters():
            if qtype is not None and p.dim() == 2:
                p.copy_(torch.from_numpy(dequantize(quantize(p.numpy(), qtype), qtype)).reshape(p.shape))
            else:
                p.copy_(p.to(torch.bfloat16).float())
        return model(torch.tensor([ids]))[0].numpy()


# llama.cpp rounds activations to bf16 for its bf16 products, and to 8 bits in blocks of 32 for its q8_0 and q4_0
# ones: the logits' largest difference as a share of their largest magnitude was 0.9%, 2.2% and 2.1% when measured,
# top-1 agreement 98-98.5%, 97.5% and 95.5%. The wrong longrope factors (the short-factor case's 200 tokens in a
# context of 512) give 42% and 55%
@pytest.mark.parametrize("gguf_type, n_ctx, length, bound, agreement", [
    ("bf16", 256, 200, 0.02, 0.97), ("bf16", 512, 300, 0.02, 0.97), ("q8_0", 256, 200, 0.04, 0.95),
    ("q4_0", 256, 200, 0.05, 0.92)], ids=["bf16-short-factors", "bf16-long-factors", "q8_0", "q4_0"])
def test_llama_cpp_computes_our_logits(phi3, exports, gguf_type, n_ctx, length, bound, agreement):
    """llama.cpp takes longrope's long factors when its context is longer than the original one, we (as
    transformers) when the sequence is: the same factors for a sequence within a context of 256, and for one
    longer than 256 in a context of 512."""
    llm = _llama(exports[gguf_type], n_ctx=n_ctx, n_batch=512, logits_all=True)
    ids = _real_ids(Tokenizer(phi3), length)
    llm.eval(ids)
    theirs, ours = np.asarray(llm.scores[:length]), _our_logits(phi3, ids, gguf_type)
    assert np.abs(theirs - ours).max() < bound * np.abs(ours).max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= agreement


def test_greedy_generation_as_ours(phi3, exports):
    llm = _llama(exports["bf16"], n_ctx=256, n_batch=512)
    prompt = Tokenizer(phi3).encode("def fibonacci(n):").tolist()
    assert _greedy(llm, prompt, 32) == _our_greedy(phi3, prompt, 32)


# Phi-4-mini's texts that llama.cpp's "gpt-4o" split cuts otherwise: its regex leaves out tiktoken's \p{M}
# (combining marks: Khmer's vowel signs, an emoji's variation selector); the ids still spell the text
PHI4_MINI_SPLIT_DIFFERENTLY = ("កាន់តែពិសេសអាចខលចេញ", "🚀 (normal) 😶\u200d🌫️")


@pytest.mark.parametrize("family", list(VOCAB_SIZES))
def test_llama_cpp_tokenizes_as_the_familys_tokenizers(family, tmp_path):
    # llama.cpp keys Phi-3's token attributes on a model name with "phi-3" in it, and then fails to load another
    # vocabulary: every family's export loads from a directory so named
    d = _family_checkpoint(tmp_path / "phi-3-named", family, n_embd=32, n_head=2, n_layer=1, intermediate_size=32)
    llm = _llama(export_gguf(d, "bf16", show_progress=False), vocab_only=True)  # (skips without llama-cpp-python)
    import llama_cpp

    meta = _fields(GGUFReader(d / "gguf" / "phi-3-named-bf16.gguf"))
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"], meta["general.name"]) == {
        "phi-3": ("llama", "default", "phi-3-named"), "phi-4": ("gpt2", "llama-bpe", "phi 3-named"),
        "phi-4-mini": ("gpt2", "gpt-4o", "phi 3-named")}[family]
    tokenizer, vocab = Tokenizer(d), llama_cpp.llama_model_get_vocab(llm.model)
    differently = 0
    for text in TEXTS:
        ours = tokenizer.encode(text).tolist()
        theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
        if family == "phi-4-mini" and any(s in text for s in PHI4_MINI_SPLIT_DIFFERENTLY):
            differently += theirs != ours
            assert _detokenize(llm, theirs) == text.encode()
            continue
        assert theirs == ours, text
        if family == "phi-3":  # SentencePiece: the pieces' "▁" as spaces, the leading one dropped
            buffer, ids = ctypes.create_string_buffer(1 << 16), (llama_cpp.llama_token * len(ours))(*ours)
            n = llama_cpp.llama_detokenize(vocab, ids, len(ours), buffer, len(buffer), False, True)
            assert buffer.raw[:n].decode() == tokenizer.decode(ours), text
        else:
            assert _detokenize(llm, ours) == text.encode(), text
    assert differently == (2 if family == "phi-4-mini" else 0)


def test_a_split_llama_cpp_does_not_know_is_one_clear_error(tmp_path):
    from lit_gpt.utils import UserError

    d = _family_checkpoint(tmp_path, "phi-4", n_embd=32, n_head=2, n_layer=1, intermediate_size=32)
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{N}{1,2}|[^\p{N}]+"  # digits in pairs
    (d / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match=r"tokenizer.json is neither a byte-level BPE with GPT-2's or tiktoken's "
                                        r"split of words \(as Phi, phi-4 and Phi-4-mini have\) nor Llama's "
                                        r"SentencePiece BPE \(as Phi-3 has\)"):
        export_gguf(d, "q8_0", show_progress=False)
    assert not (d / "gguf").exists() or list((d / "gguf").iterdir()) == []
