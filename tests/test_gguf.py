"""GGUF export: the file holds llama.cpp's phi2 layout and our tokenizer, and llama.cpp (llama-cpp-python) computes on
it what we compute, on the demo model and real held-out text.

The llama.cpp tests need llama-cpp-python (`pip install 'lit-phi[bench]'`, which compiles llama.cpp) and skip
without it; the layout tests read the files with the gguf package alone.
"""

import ctypes
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from safetensors import safe_open

from lit_gpt.gguf_export import cached_gguf, default_gguf_path, export_gguf, gguf_tensor_bytes
from lit_gpt.config import Config
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import InvalidArgument, NeedsStep, UserError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "demo" / "phi-stdlib"  # as a fresh clone has it: Hugging Face files, not yet converted
TYPES = ("bf16", "q8_0", "q4_0")
# held-out files of the demo model (its training.json's data.val_files), ~14k tokens, read from this interpreter's
# standard library (the demo was trained on Python 3.11's)
HELD_OUT = ("chunk.py", "sched.py", "copyreg.py", "lib2to3/fixer_base.py", "lib2to3/pgen2/parse.py",
            "test/test_email/test_parser.py", "concurrent/futures/process.py")
LLAMA_CPP_REASON = "llama-cpp-python is not installed (pip install 'lit-phi[bench]', which compiles llama.cpp)"


@pytest.fixture(scope="module")
def demo(demo_checkpoint) -> Path:
    return demo_checkpoint


@pytest.fixture(scope="module")
def exports(demo, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {t: export_gguf(demo, t, out / f"demo-{t}.gguf", show_progress=False) for t in TYPES}


def _fields(reader: GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def test_export_has_llama_cpps_phi2_layout_and_our_tokenizer(exports):
    reader = GGUFReader(exports["bf16"])
    meta = _fields(reader)
    assert meta["general.architecture"] == "phi2" and meta["general.file_type"] == 32  # MOSTLY_BF16
    assert {k: meta[f"phi2.{k}"] for k in ("context_length", "embedding_length", "feed_forward_length", "block_count",
                                           "attention.head_count", "attention.head_count_kv", "rope.dimension_count")} \
        == {"context_length": 512, "embedding_length": 256, "feed_forward_length": 1024, "block_count": 6,
            "attention.head_count": 8, "attention.head_count_kv": 8, "rope.dimension_count": 16}
    assert meta["phi2.rope.freq_base"] == 10000.0 and meta["phi2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    spec = json.loads((SHIPPED / "tokenizer.json").read_text())
    vocab = {i: token for token, i in spec["model"]["vocab"].items()}
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == [vocab[i] for i in range(8192)]
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in spec["model"]["merges"]]
    assert meta["tokenizer.ggml.token_type"] == [3] + [1] * 8191  # <|endoftext|> is a control token
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (0, 0)
    assert meta["tokenizer.ggml.add_bos_token"] is False

    # the weights are the Hub-format file's, bit for bit: q, k, v as llama.cpp splits attn_qkv ([q; k; v])
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 1 + 2 + 2 + 6 * 10  # embedding, head, final norm; 10 per block
    with safe_open(SHIPPED / "model.safetensors", "pt") as hf:
        def bf16(name):
            t = tensors[name]
            assert t.tensor_type == GGMLQuantizationType.BF16
            return torch.from_numpy(np.array(t.data)).view(torch.bfloat16).reshape(*reversed(t.shape.tolist()))

        attn = "model.layers.3.self_attn."
        qkv = torch.cat([hf.get_tensor(f"{attn}{p}_proj.weight") for p in "qkv"])
        assert torch.equal(bf16("blk.3.attn_qkv.weight"), qkv)
        assert torch.equal(bf16("token_embd.weight"), hf.get_tensor("model.embed_tokens.weight"))
        assert torch.equal(bf16("blk.5.ffn_down.weight"), hf.get_tensor("model.layers.5.mlp.fc2.weight"))
        bias = torch.cat([hf.get_tensor(f"{attn}{p}_proj.bias") for p in "qkv"])
        assert tensors["blk.3.attn_qkv.bias"].tensor_type == GGMLQuantizationType.F32
        assert torch.equal(torch.from_numpy(np.array(tensors["blk.3.attn_qkv.bias"].data)), bias.float())


@pytest.mark.parametrize("gguf_type, qtype, bound", [("q8_0", GGMLQuantizationType.Q8_0, 0.01),
                                                    ("q4_0", GGMLQuantizationType.Q4_0, 0.15)])
def test_quantized_exports_hold_every_matrix_in_blocks_of_32(demo, exports, gguf_type, qtype, bound):
    reader = GGUFReader(exports[gguf_type])
    tensors = {t.name: t for t in reader.tensors}
    matrices = [t for t in tensors.values() if len(t.shape) == 2]
    assert len(matrices) == 2 + 6 * 4 and all(t.tensor_type == qtype for t in matrices)
    assert all(t.tensor_type == GGMLQuantizationType.F32 for t in tensors.values() if len(t.shape) == 1)
    assert sum(int(t.n_bytes) for t in tensors.values()) == sum(gguf_tensor_bytes(Config.from_json(
        demo / "lit_config.json"), gguf_type).values())
    with safe_open(SHIPPED / "model.safetensors", "pt") as hf:
        weight = hf.get_tensor("model.layers.2.mlp.fc1.weight").float().numpy()
    t = tensors["blk.2.ffn_up.weight"]
    restored = dequantize(np.array(t.data), qtype).reshape(weight.shape)
    # 8 bits: within half a step of 1/127 of each block's largest weight; 4 bits: 1/8 of it
    assert np.abs(restored - weight).max() / np.abs(weight).max() < bound


def _copy_demo(demo: Path, tmp_path: Path) -> Path:
    out = tmp_path / "phi-stdlib"
    out.mkdir()
    for name in ("lit_config.json", "lit_model.pth", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        shutil.copyfile(demo / name, out / name)
    return out


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.suffix == ".gguf" or ".tmp" in p.name)


def test_bad_inputs_are_one_line_and_leave_no_file(demo, tmp_path):
    ckpt = _copy_demo(demo, tmp_path)
    spec = json.loads((ckpt / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (ckpt / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match=r"tokenizer.json is neither a byte-level BPE with GPT-2's or tiktoken's split "
                                        r"of words .* nor Llama's SentencePiece BPE"):
        export_gguf(ckpt, "q4_0", show_progress=False)
    spec["pre_tokenizer"] = json.loads((SHIPPED / "tokenizer.json").read_text())["pre_tokenizer"]
    spec["added_tokens"].append({"id": 8192, "content": "<|extra|>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    (ckpt / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="has token id 8192, beyond the model's 8192 embedding rows"):
        export_gguf(ckpt, "bf16", show_progress=False)
    with pytest.raises(InvalidArgument, match=r"output .* is a directory; name the file to write"):
        export_gguf(demo, "bf16", tmp_path, show_progress=False)
    with pytest.raises(InvalidArgument, match="gguf_type must be one of bf16, q8_0, q4_0, got 'q5_k'"):
        export_gguf(demo, "q5_k", tmp_path / "x.gguf", show_progress=False)
    (ckpt / "lit_model.pth").unlink()
    with pytest.raises(NeedsStep, match="lit_model.pth is missing; convert the checkpoint first"):
        export_gguf(ckpt, "bf16", show_progress=False)
    with pytest.raises(UserError, match="checkpoint directory .*nowhere does not exist"):
        export_gguf(tmp_path / "nowhere", "bf16", show_progress=False)
    assert _leftovers(tmp_path) == []


def test_a_failed_export_leaves_nothing_and_the_cache_follows_lit_model(demo, tmp_path, monkeypatch):
    import lit_gpt.gguf_export as gguf_export

    ckpt = _copy_demo(demo, tmp_path)
    real, written = gguf_export._gguf_tensor, []

    def failing(tensor, planned, config):
        if len(written) == 5:
            raise OSError(28, "No space left on device")
        written.append(planned.name)
        return real(tensor, planned, config)

    monkeypatch.setattr(gguf_export, "_gguf_tensor", failing)
    with pytest.raises(OSError, match="No space left"):
        cached_gguf(ckpt, "q8_0", show_progress=False)
    assert _leftovers(tmp_path) == []
    monkeypatch.setattr(gguf_export, "_gguf_tensor", real)

    path = cached_gguf(ckpt, "q8_0", show_progress=False)
    assert path == default_gguf_path(ckpt, "q8_0") == ckpt / "gguf" / "phi-stdlib-q8_0.gguf"
    stamp = path.stat().st_mtime_ns
    assert cached_gguf(ckpt, "q8_0", show_progress=False).stat().st_mtime_ns == stamp  # fresh: kept
    os.utime(ckpt / "lit_model.pth", ns=(stamp + 10**9, stamp + 10**9))  # the checkpoint changed: exported again
    assert cached_gguf(ckpt, "q8_0", show_progress=False).stat().st_mtime_ns > stamp


@pytest.mark.slow
def test_export_script(tmp_path):
    """On the shipped files, as a fresh clone has them: the script converts them first, as generate does."""
    script = [sys.executable, str(ROOT / "scripts" / "export_gguf.py")]
    demo = tmp_path / "phi-stdlib"
    shutil.copytree(SHIPPED, demo, ignore=shutil.ignore_patterns("lit_*", "gguf"))
    ok = subprocess.run([*script, "--checkpoint_dir", str(demo), "--gguf_type", "q4_0", "--output",
                         str(tmp_path / "demo.gguf")], capture_output=True, text=True, timeout=300)
    lines = ok.stderr.splitlines()
    assert ok.returncode == 0 and lines[0] == f"{demo} holds Hugging Face weights but no lit_model.pth; converting " \
        "it first" and lines[-1] == f"wrote {tmp_path / 'demo.gguf'} (0.01 GB)", ok.stderr
    assert GGUFReader(tmp_path / "demo.gguf").fields["general.file_type"].contents() == 2  # MOSTLY_Q4_0
    for args, line in [
        (["--checkpoint_dir", str(demo), "--output", str(tmp_path)],
         f"error: --output {tmp_path} is a directory; name the file to write, e.g. {tmp_path}/phi-stdlib-bf16.gguf"),
        (["--checkpoint_dir", str(tmp_path / "nowhere")],
         f"error: checkpoint directory {tmp_path / 'nowhere'} does not exist"),
    ]:
        bad = subprocess.run([*script, *args], capture_output=True, text=True, timeout=300)
        assert bad.returncode == 1 and bad.stderr.splitlines() == [line], bad.stderr


def _llama(path: Path, **kwargs):
    llama_cpp = pytest.importorskip("llama_cpp", reason=LLAMA_CPP_REASON)
    return llama_cpp.Llama(str(path), n_threads=1, verbose=False, **kwargs)


def _detokenize(llm, ids: list[int]) -> bytes:
    """The text of `ids` as llama.cpp spells each token (llama_token_to_piece). Not llama-cpp-python's detokenize:
    it reads each piece into 32 bytes and garbles longer ones (the demo has 19 tokens of 33-64 bytes, runs of # and =)."""
    import llama_cpp

    vocab, buffer, out = llama_cpp.llama_model_get_vocab(llm.model), ctypes.create_string_buffer(256), b""
    for token in ids:
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, True)
        assert 0 <= n <= len(buffer)
        out += buffer.raw[:n]
    return out


def _held_out_texts() -> list[str]:
    val_files = json.loads((SHIPPED / "training.json").read_text())["data"]["val_files"]
    assert set(HELD_OUT) <= set(val_files)  # the model never trained on them
    root = Path(sysconfig.get_paths()["stdlib"])
    if not all((root / name).is_file() for name in HELD_OUT):
        pytest.skip(f"this Python's standard library ({root}) lacks the demo's held-out files")
    return [(root / name).read_text(encoding="utf-8") for name in HELD_OUT]


def _windows(tokenizer: Tokenizer, texts: list[str], count: int, size: int = 512) -> list[list[int]]:
    """The first `count` non-overlapping windows of the texts' ids (eos after each text), as evaluate.py scores."""
    ids = [i for text in texts for i in tokenizer.encode(text).tolist() + [tokenizer.eos_id]]
    assert len(ids) >= count * size
    return [ids[k * size:(k + 1) * size] for k in range(count)]


def _llama_top1(llm, windows: list[list[int]]) -> np.ndarray:
    predicted = []
    for window in windows:
        llm.reset()
        llm.eval(window)
        predicted.append(np.asarray(llm.scores[:len(window)]).argmax(-1))
    return np.concatenate(predicted)


def _our_top1(demo: Path, dtype: torch.dtype, windows: list[list[int]]) -> np.ndarray:
    from lit_gpt.load import load_model

    model = load_model(demo, dtype=dtype)
    with torch.no_grad():
        return np.concatenate([model(torch.tensor([w]))[0].argmax(-1).numpy() for w in windows])


def _greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(prompt, top_k=1, temp=0.0):
        out.append(token)
        if len(out) == n:
            return out


def _our_greedy(demo: Path, prompt: list[int], n: int) -> list[int]:
    from lit_gpt.generate import generate_tokens
    from lit_gpt.load import load_model

    model = load_model(demo, dtype=torch.float32)
    model.set_kv_cache(1, max_seq_length=len(prompt) + n)
    return [int(t) for t in generate_tokens(model, torch.tensor(prompt), len(prompt) + n, temperature=0.0)]


@pytest.mark.slow
def test_llama_cpp_tokenizes_and_predicts_as_we_do_on_held_out_text(demo, exports):
    llm = _llama(exports["bf16"], n_ctx=512, n_batch=512, logits_all=True)
    tokenizer, texts = Tokenizer(demo), _held_out_texts()
    for text in texts:
        ids = tokenizer.encode(text).tolist()
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        assert _detokenize(llm, ids) == text.encode()
    windows = _windows(tokenizer, texts, 8)
    theirs, fp32, bf16 = _llama_top1(llm, windows), _our_top1(demo, torch.float32, windows), _our_top1(demo, torch.bfloat16, windows)
    assert (theirs == fp32).mean() >= 0.99  # 99.9% when measured
    # llama.cpp multiplies the bf16 weights with float32 activations, as our float32 does; our bf16 also rounds the
    # activations to bf16 between operations, and agrees with our own float32 on only 98.7% of these positions
    assert (theirs == bf16).mean() >= min(0.98, (fp32 == bf16).mean() - 0.005)
    prompt = tokenizer.encode("def fibonacci(n):").tolist()
    assert _greedy(llm, prompt, 32) == _our_greedy(demo, prompt, 32)


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type, same_tokens, agreement", [("q8_0", 32, 0.97), ("q4_0", 6, 0.85)])
def test_quantized_exports_load_and_generate(demo, exports, gguf_type, same_tokens, agreement):
    llm = _llama(exports[gguf_type], n_ctx=512, n_batch=512, logits_all=True)
    tokenizer = Tokenizer(demo)
    prompt = tokenizer.encode("def fibonacci(n):").tolist()
    continuation = _greedy(llm, prompt, 32)
    assert len(continuation) == 32 and all(0 <= t < 8192 for t in continuation)
    # greedy decoding follows ours for a while (q8_0 for all 60 tokens tried, q4_0 for 9), then q4_0 drifts
    assert continuation[:same_tokens] == _our_greedy(demo, prompt, same_tokens)
    assert tokenizer.decode(continuation).startswith('\n    """\n')
    windows = _windows(tokenizer, _held_out_texts(), 2)
    assert (_llama_top1(llm, windows) == _our_top1(demo, torch.float32, windows)).mean() >= agreement


@pytest.mark.slow
def test_llama_cpp_tokenizes_as_phis_tokenizer(tmp_path):
    """Phi's own tokenizer (GPT-2's BPE plus runs of spaces and tabs, added tokens) on a random phi-2-shaped
    checkpoint: llama.cpp splits the runs out first as tokenizers does."""
    from lit_gpt.convert import convert_hf_checkpoint
    from lit_gpt.random_checkpoint import write_random_hf_checkpoint

    config = Config.from_name("phi-2", n_layer=1, n_embd=64, n_head=2, intermediate_size=128)
    write_random_hf_checkpoint(tmp_path, config=config, shards=1)
    convert_hf_checkpoint(tmp_path, show_progress=False)
    llm = _llama(export_gguf(tmp_path, "bf16", show_progress=False), vocab_only=True)
    tokenizer = Tokenizer(tmp_path)
    edge_cases = ["<|endoftext|>def f():\n\treturn  1  \n" + " " * 40 + "x\t\t\t\ty", "héllo 🦙 wörld\n\n\n  \t\t ",
                  "  leading spaces", "I've 'RE 3333 ..."]
    for text in _held_out_texts() + edge_cases:
        ids = tokenizer.encode(text).tolist()
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        assert _detokenize(llm, ids) == text.encode()
    whitespace = tokenizer.encode("        return").tolist()
    assert whitespace == [tokenizer.token_to_id(" " * 8), tokenizer.token_to_id("return")]  # the run splits first
