"""GGUF export: a converted checkpoint as one file that llama.cpp loads, in bf16, q8_0 or q4_0, written with the
`gguf` package. Phi-1/1.5/2 go in as llama.cpp's "phi2" architecture, the later family (Phi-3, Phi-3.5, Phi-4-mini,
phi-4) as its "phi3": fused [q; k; v] and [gate; up] as transformers has them, longrope's factors as two tensors.

The tensors are read one at a time from the memory-mapped lit_model.pth and written in the same pass (the header
lists every tensor's size up front, so nothing has to be held until the end): phi-2 exports with about one tensor in
memory. Matrices are bf16, or q8_0 / q4_0 (llama.cpp's blocks of 32 weights with one fp16 scale: 8.5 and 4.5 bits a
weight), the embedding included; norms and biases are float32, as llama.cpp adds them. The tokenizer goes in as
llama.cpp's "gpt2" BPE (tokens, merges, token types, the split regex by its llama.cpp name) for the byte-level ones
(Phi-1/1.5/2, phi-4, Phi-4-mini), or as its "llama" SentencePiece (tokens, scores, token types) for Phi-3/3.5's, so
llama.cpp tokenizes text as we do.
"""

import json
import re
from pathlib import Path
from typing import Literal, NamedTuple, Optional

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quant_shape_to_byte_shape, quantize

from lit_gpt.choices import check_choice
from lit_gpt.config import Config
from lit_gpt.convert import lit_to_qkv
from lit_gpt.files import LIT_CONFIG, LIT_MODEL
from lit_gpt.load import _FilePages, expected_shapes, load_lit_state_dict
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import InvalidArgument, UserError, atomic_path, progress

GgufType = Literal["bf16", "q8_0", "q4_0"]
GGUF_DIR = "gguf"  # where exports go by default, inside the checkpoint directory (the benchmark's cache too)

# llama.cpp's architecture for each of our blocks (Config.parallel_residual)
GGUF_ARCH = {True: "phi2", False: "phi3"}
# our tensor names -> llama.cpp's phi2 and phi3 names (the prefix of each; the rest, "weight" or "bias", is kept). q,
# k and v go in as one attn_qkv, which llama.cpp splits as [q; k; v]: ours interleaves them per group of heads (see
# _gguf_tensor). phi3's ffn_up is our fused [gate; up], the halves in the order llama.cpp's swiglu splits them
GGUF_NAMES = (
    (r"transformer\.wte\.", "token_embd."),
    (r"transformer\.h\.(\d+)\.norm_1\.", r"blk.\1.attn_norm."),
    (r"transformer\.h\.(\d+)\.norm_2\.", r"blk.\1.ffn_norm."),
    (r"transformer\.h\.(\d+)\.attn\.attn\.", r"blk.\1.attn_qkv."),
    (r"transformer\.h\.(\d+)\.attn\.proj\.", r"blk.\1.attn_output."),
    (r"transformer\.h\.(\d+)\.mlp\.fc\.", r"blk.\1.ffn_up."),
    (r"transformer\.h\.(\d+)\.mlp\.proj\.", r"blk.\1.ffn_down."),
    (r"transformer\.ln_f\.", "output_norm."),
    (r"lm_head\.", "output."),
)
# tiktoken's split regexes (as transformers writes them into tokenizer.json) -> llama.cpp's pre-tokenizer that splits
# the same way: cl100k_base (phi-4) is llama-3's regex, o200k_base (Phi-4-mini) GPT-4o's
SPLIT_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+": "gpt-4o",
}
# Quantize this many weights at a time: gguf's numpy quantizers make several float32 copies of their input, and
# phi-2's LM head alone is 131M weights
_CHUNK_ELEMENTS = 1 << 20


class _Planned(NamedTuple):
    """One tensor of the file: its GGUF name, shape (rows first, as in torch), type, and where it comes from: our
    tensor's name, or else its values (longrope's factors), or neither (a zero bias llama.cpp's phi2 needs and the
    checkpoint lacks)."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    source: Optional[str]
    values: Optional[tuple[float, ...]] = None


def default_gguf_path(checkpoint_dir: Path, gguf_type: GgufType) -> Path:
    """<checkpoint_dir>/gguf/<dir name>-<type>.gguf, e.g. checkpoints/microsoft/phi-2/gguf/phi-2-q4_0.gguf."""
    checkpoint_dir = Path(checkpoint_dir)
    return checkpoint_dir / GGUF_DIR / f"{checkpoint_dir.resolve().name}-{gguf_type}.gguf"


def export_gguf(checkpoint_dir: Path, gguf_type: GgufType = "bf16", output: Optional[Path] = None,
                show_progress: bool = True) -> Path:
    """Write the converted checkpoint in `checkpoint_dir` as a GGUF file for llama.cpp (default path:
    `default_gguf_path`); returns the path. Everything is checked (config, weights, tokenizer) before the file is
    started, and it takes its name only when complete."""
    check_choice("gguf_type", gguf_type, GgufType)
    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise UserError(f"{checkpoint_dir} is a file, not a checkpoint directory")
    if not checkpoint_dir.is_dir():
        raise UserError(f"checkpoint directory {checkpoint_dir} does not exist")
    output = Path(output) if output is not None else default_gguf_path(checkpoint_dir, gguf_type)
    if output.is_dir():
        raise InvalidArgument("output", f"{output} is a directory; name the file to write, e.g. "
                                        f"{output / default_gguf_path(checkpoint_dir, gguf_type).name}")
    config = Config.from_json(checkpoint_dir / LIT_CONFIG)
    _check_llama_cpp_shape(config, checkpoint_dir)
    state_dict = load_lit_state_dict(checkpoint_dir, config)
    tokenizer = Tokenizer(checkpoint_dir)
    vocab = gguf_vocab(tokenizer, config.padded_vocab_size)
    plan = _plan(config, gguf_type)
    pages = _FilePages(state_dict.values())
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        writer = GGUFWriter(tmp, GGUF_ARCH[config.parallel_residual])
        try:
            _add_metadata(writer, config, vocab, gguf_type, checkpoint_dir.resolve().name, tokenizer.chat_template)
            for t in plan:
                dtype = np.float32 if t.qtype == GGMLQuantizationType.F32 else np.uint8
                writer.add_tensor_info(t.name, _byte_shape(t), np.dtype(dtype), _nbytes(t), raw_dtype=t.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in progress(plan, len(plan), f"exporting {gguf_type}", show_progress):
                source = None if t.source is None else state_dict[t.source]
                writer.write_tensor_data(_gguf_tensor(source, t, config))
                if source is not None:
                    pages.release(source)  # the mapping's pages just read: phi-2 would otherwise end 5.6 GB resident
        finally:
            writer.close()
    return output


def cached_gguf(checkpoint_dir: Path, gguf_type: GgufType, show_progress: bool = True) -> Path:
    """The export at `default_gguf_path`, written first if it is missing or older than lit_model.pth."""
    path = default_gguf_path(checkpoint_dir, gguf_type)
    source = Path(checkpoint_dir) / LIT_MODEL
    if path.is_file() and source.is_file() and path.stat().st_mtime_ns >= source.stat().st_mtime_ns:
        return path
    return export_gguf(checkpoint_dir, gguf_type, path, show_progress)


def _check_llama_cpp_shape(config: Config, checkpoint_dir: Path) -> None:
    """Heads that split n_embd exactly: llama.cpp's phi2 and phi3 size the attention (phi3 its output projection) by
    n_embd."""
    if config.n_head * config.head_size != config.n_embd:
        raise UserError(f"{checkpoint_dir / LIT_CONFIG} has {config.n_head} heads of {config.head_size} dims, which is "
                        f"not n_embd {config.n_embd}; llama.cpp's {GGUF_ARCH[config.parallel_residual]} architecture "
                        "needs n_head x head_size = n_embd")


def gguf_tensor_bytes(config: Config, gguf_type: GgufType) -> dict[str, int]:
    """The bytes of every tensor in the export, by GGUF name (what llama.cpp reads per decode step, for the
    benchmark)."""
    return {t.name: _nbytes(t) for t in _plan(config, gguf_type)}


def _plan(config: Config, gguf_type: GgufType) -> list[_Planned]:
    """Every tensor of the file, in our order. phi2: a zero bias after each Linear the config builds without one
    (bias=False), as llama.cpp's phi2 requires them. phi3: no biases (the family has none), no output.weight where
    the head is the embedding (llama.cpp uses token_embd then), and longrope's two sets of factors."""
    plan = []
    shapes = expected_shapes(config)
    for name, shape in shapes.items():
        plan.append(_Planned(_gguf_name(name), tuple(shape), _tensor_type(shape, gguf_type), name))
        bias = name.removesuffix("weight") + "bias"
        if config.parallel_residual and len(shape) == 2 and "wte" not in name and bias not in shapes:
            plan.append(_Planned(_gguf_name(bias), (shape[0],), _tensor_type((shape[0],), gguf_type), None))
    if config.longrope:
        T = GGMLQuantizationType
        for kind, factors in (("long", config.rope_long_factor), ("short", config.rope_short_factor)):
            plan.append(_Planned(f"rope_factors_{kind}.weight", (len(factors),), T.F32, None, tuple(factors)))
    return plan


def _gguf_name(name: str) -> str:
    for pattern, replacement in GGUF_NAMES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name, count=1)
    raise AssertionError(f"no GGUF name for {name}")  # GGUF_NAMES covers every tensor GPT has


def _tensor_type(shape, gguf_type: GgufType) -> GGMLQuantizationType:
    T = GGMLQuantizationType
    if len(shape) == 1:
        return T.F32
    # q8_0 and q4_0 quantize rows in blocks of 32 (every Phi matrix has such rows); another width stays bf16
    if gguf_type == "bf16" or shape[-1] % 32:
        return T.BF16
    return T.Q8_0 if gguf_type == "q8_0" else T.Q4_0


def _byte_shape(t: _Planned) -> tuple[int, ...]:
    return t.shape if t.qtype == GGMLQuantizationType.F32 else quant_shape_to_byte_shape(t.shape, t.qtype)


def _nbytes(t: _Planned) -> int:
    return int(np.prod(_byte_shape(t))) * (4 if t.qtype == GGMLQuantizationType.F32 else 1)


def _gguf_tensor(tensor: Optional[torch.Tensor], t: _Planned, config: Config) -> np.ndarray:
    """The bytes of one tensor as the file holds it (float32 values, or uint8 rows of bf16 or of q8_0/q4_0 blocks)."""
    T = GGMLQuantizationType
    if tensor is None:
        return np.zeros(t.shape, dtype=np.float32) if t.values is None else np.asarray(t.values, dtype=np.float32)
    if ".attn_qkv." in t.name:
        tensor = torch.cat(lit_to_qkv(tensor, config))  # per-head [q_h, k_h, v_h] -> [q; k; v]
    if t.qtype == T.F32:
        return tensor.float().contiguous().numpy()
    if t.qtype == T.BF16:  # torch rounds to nearest even, as gguf's own bf16 conversion does
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    out = np.empty(_byte_shape(t), dtype=np.uint8)
    step = max(1, _CHUNK_ELEMENTS // t.shape[-1])
    for row in range(0, t.shape[0], step):
        out[row:row + step] = quantize(tensor[row:row + step].float().numpy(), t.qtype)
    return out


def gguf_vocab(tokenizer: Tokenizer, n_vocab: int) -> dict:
    """The tokenizer in llama.cpp's terms: a token per id up to the model's (padded) vocabulary, with their types,
    and bos/eos. Two kinds, the ones the Phi models use, each written so that llama.cpp tokenizes as `tokenizers`:

    - byte-level BPE with GPT-2's split of words (Phi-1/1.5/2, pretrain/'s models) or tiktoken's (phi-4, Phi-4-mini):
      llama.cpp's "gpt2" model, the tokens in tokenizer.json's byte-level spelling, the merges by rank, and the
      split regex by llama.cpp's name for it;
    - Llama's SentencePiece BPE with byte fallback (Phi-3, Phi-3.5): llama.cpp's "llama" model, whose merges are
      the pieces' scores: each piece scores by its best merge's rank, which orders the pairs as the merges do.
    """
    spec = json.loads(tokenizer.processor.to_str())
    model, path = spec.get("model") or {}, tokenizer.checkpoint_dir / "tokenizer.json"
    sentencepiece = model.get("byte_fallback") and _sentencepiece_normalizer(spec.get("normalizer")) \
        and spec.get("pre_tokenizer") is None
    pre = None if model.get("byte_fallback") or spec.get("normalizer") else _byte_level_pre(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or not (sentencepiece or pre):
        raise UserError(f"{path} is neither a byte-level BPE with GPT-2's or tiktoken's split of words (as Phi, phi-4 "
                        "and Phi-4-mini have) nor Llama's SentencePiece BPE (as Phi-3 has); the GGUF export writes "
                        "only those, the kinds llama.cpp tokenizes as tokenizers does")
    T = TokenType  # an enum member looked up per token costs 0.15 s for 8k tokens: ints below
    normal, byte, unknown = int(T.NORMAL), int(T.BYTE), int(T.UNKNOWN)
    tokens, types = [f"[PAD{i}]" for i in range(n_vocab)], [int(T.UNUSED)] * n_vocab
    entries = [(i, token, byte if sentencepiece and _BYTE_PIECE.fullmatch(token) else normal)
               for token, i in model["vocab"].items()]
    if sentencepiece and model.get("unk_token") in model["vocab"]:
        entries.append((model["vocab"][model["unk_token"]], model["unk_token"], unknown))
    # added tokens are matched in the text before BPE by llama.cpp too: special ones (<|endoftext|>) as control
    # tokens, the others (Phi's runs of spaces and tabs) as user-defined ones, spelled as plain text
    entries += [(a["id"], a["content"], int(T.CONTROL if a.get("special") else T.USER_DEFINED))
                for a in spec.get("added_tokens") or []]
    for i, token, kind in entries:
        if not 0 <= i < n_vocab:
            raise UserError(f"{path} has token id {i}, beyond the model's {n_vocab} embedding rows; it is not this "
                            "model's tokenizer")
        tokens[i], types[i] = token, kind
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges") or []]
    vocab = {"tokens": tokens, "types": types, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id}
    if pre:
        return {**vocab, "model": "gpt2", "pre": pre, "merges": [" ".join(m) for m in merges]}
    scores = [0.0] * n_vocab
    for rank in reversed(range(len(merges))):  # the best (lowest) rank of each result written last, so it stays
        scores[model["vocab"][merges[rank][0] + merges[rank][1]]] = -float(rank)
    unk = model["vocab"].get(model.get("unk_token"))
    return {**vocab, "model": "llama", "pre": "default", "scores": scores, "unk": unk}


_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def _byte_level_pre(pre: Optional[dict]) -> Optional[str]:
    """llama.cpp's name for the split of a byte-level BPE's pre-tokenizer: "gpt-2" for tokenizers' ByteLevel with
    GPT-2's regex and no added prefix space (alone, or alone in a Sequence), the SPLIT_PRE_TOKENIZERS name for a
    Split on tiktoken's regex followed by a ByteLevel without regex; None for any other."""
    if not pre:
        return None
    steps = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]
    byte_level = steps[-1] if steps and steps[-1].get("type") == "ByteLevel" else None
    if byte_level is None or byte_level.get("add_prefix_space", False):
        return None
    if len(steps) == 1:
        return "gpt-2" if byte_level.get("use_regex", True) else None
    split = steps[0]
    # the regex covers all text, so keeping its matches (Isolated) or removing what is between them (inverted
    # Removed, as the Hub's files have it) is one split
    if len(steps) != 2 or byte_level.get("use_regex", True) or split.get("type") != "Split" or \
            (split.get("behavior"), bool(split.get("invert"))) not in (("Isolated", False), ("Removed", True)):
        return None
    return SPLIT_PRE_TOKENIZERS.get((split.get("pattern") or {}).get("Regex"))


def _sentencepiece_normalizer(normalizer: Optional[dict]) -> bool:
    """Llama's SentencePiece as tokenizers has it: "▁" prepended, spaces spelled "▁" (what llama.cpp's "llama"
    tokenizer does to each piece of text between added tokens)."""
    steps = (normalizer or {}).get("normalizers") or []
    return len(steps) == 2 and steps[0] == {"type": "Prepend", "prepend": "▁"} and \
        steps[1].get("type") == "Replace" and steps[1].get("pattern") == {"String": " "} and \
        steps[1].get("content") == "▁"


def _add_metadata(writer: GGUFWriter, config: Config, vocab: dict, gguf_type: GgufType, name: str,
                  chat_template: Optional[str]) -> None:
    """The keys llama.cpp's phi2 or phi3 reads: sizes, norm epsilon, rotary dims and base, phi3's sliding window
    and longrope; and the tokenizer, with the chat template."""
    # llama.cpp gives Phi-3's added tokens their rstrip (tokenizer.json's flag) by the model's name alone, and then
    # looks up <s>, </s> and <unk>, failing to load a vocabulary without them: the name says Phi-3 exactly when the
    # vocabulary is Phi-3's SentencePiece
    if vocab["model"] == "llama" and not re.search("phi-?3", name, re.IGNORECASE):
        name = f"Phi-3 {name}"
    elif vocab["model"] != "llama":
        name = re.sub("(phi)-?(3)", r"\1 \2", name, flags=re.IGNORECASE)  # phi-3-mini -> phi 3-mini
    writer.add_name(name)
    writer.add_file_type({"bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
                          "q4_0": LlamaFileType.MOSTLY_Q4_0}[gguf_type])
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_query_groups)
    writer.add_rope_dimension_count(config.rope_n_elem)
    writer.add_rope_freq_base(float(config.rope_base))
    if config.parallel_residual:
        writer.add_layer_norm_eps(config.norm_eps)
    else:
        writer.add_layer_norm_rms_eps(config.norm_eps)
        # llama.cpp reads the window but does not apply it yet (it warns): past the window its phi3 attends further
        writer.add_sliding_window(config.sliding_window or 0)
        if config.longrope:
            # llama.cpp takes the long factors for a context longer than the original, from the first token (we
            # switch, as transformers does, once the sequence is longer), and scales cos and sin by attn_factor
            writer.add_rope_scaling_orig_ctx_len(config.rope_original_max_seq_len)
            writer.add_rope_scaling_attn_factors(config.longrope_scale)
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if "merges" in vocab:
        writer.add_token_merges(vocab["merges"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
    if vocab.get("unk") is not None:
        writer.add_unk_token_id(vocab["unk"])
    if vocab["bos"] is not None:
        writer.add_bos_token_id(vocab["bos"])
    if vocab["eos"] is not None:
        writer.add_eos_token_id(vocab["eos"])
    writer.add_add_bos_token(False)  # the Phi models were trained without a leading bos (our Tokenizer.encode's)
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)
