"""The Phi family's tokenizers: load, encode, decode, stream, and rebuild them offline.

- phi-1, phi-1_5, phi-2: CodeGen = GPT-2's byte-level BPE + 38 whitespace tokens (`write_phi_tokenizer`).
- Phi-3, Phi-3.5: Llama's SentencePiece BPE with byte fallback + chat tokens (`write_phi3_tokenizer`, from the
  vocabulary llama.cpp ships as a GGUF file).
- phi-4 and Phi-4-mini: byte-level BPE on tiktoken's cl100k_base / o200k_base ranks + chat tokens
  (`write_tiktoken_tokenizer`, from the ranks the js-tiktoken package ships).

The heavy lifting is done by the `tokenizers` library reading the checkpoint's tokenizer.json, so ids match
`transformers` exactly. What this module adds: bos/eos and chat template lookup from the Hub's config files, and
streaming decoders that never print half a UTF-8 character and give `decode`'s text exactly.
"""

import base64
import codecs
import json
import lzma
import re
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from lit_gpt.utils import NeedsStep, UserError, first_line

EOT = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257  # ids 0..50256; 50256 is <|endoftext|>
# CodeGen/Phi appends whitespace runs so that indented code costs one token per indent level:
# 31 down to 2 spaces get ids 50257..50286, 9 down to 2 tabs get 50287..50294 (longest first).
PHI_ADDED_TOKENS = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]
# GPT-2's vocabulary and merges (MIT, LICENSE beside them), shipped with the package: Phi's tokenizer is
# rebuilt from them where the Hub cannot be reached (random-weight checkpoints for benchmarks and tests)
GPT2_BPE_DIR = Path(__file__).resolve().parent / "assets" / "gpt2-bpe"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# The ids generation stops at, as the models' generation_config.json files give them (for checkpoint writers).
GENERATION_IDS = {
    "phi-2": {"bos_token_id": 50256, "eos_token_id": 50256},
    "phi-3": {"bos_token_id": 1, "eos_token_id": [32000, 32001, 32007], "pad_token_id": 32000},
    "phi-4": {"bos_token_id": 100257, "eos_token_id": 100265, "pad_token_id": 100349},
    "phi-4-mini": {"bos_token_id": 199999, "eos_token_id": [200020, 199999], "pad_token_id": 199999},
}


def write_phi_tokenizer(out_dir: Path, gpt2_dir: Path = GPT2_BPE_DIR) -> None:
    """Write Phi's tokenizer files into `out_dir`, built from GPT-2's encoder.json and vocab.bpe in `gpt2_dir`.

    The layout mirrors the Hub's microsoft/phi-2 repo (tokenizer.json, vocab.json, merges.txt, added_tokens.json,
    special_tokens_map.json, tokenizer_config.json), so both `Tokenizer` and `transformers.AutoTokenizer` load it.
    """
    out_dir, gpt2_dir = Path(out_dir), Path(gpt2_dir)
    try:
        vocab = json.loads((gpt2_dir / "encoder.json").read_text(encoding="utf-8"))
        bpe_lines = (gpt2_dir / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the GPT-2 vocab in {gpt2_dir} ({e}); it needs encoder.json and vocab.bpe")
    if len(vocab) != GPT2_VOCAB_SIZE or vocab.get(EOT) != GPT2_VOCAB_SIZE - 1:
        raise UserError(f"{gpt2_dir / 'encoder.json'} is not GPT-2's vocab (expected {GPT2_VOCAB_SIZE} tokens)")
    # vocab.bpe starts with a "#version: 0.2" line, then one merge ("a b") per line.
    merge_lines = [line for line in bpe_lines if line and not line.startswith("#version")]
    merges = [tuple(line.split(" ")) for line in merge_lines]

    tok = HFTokenizer(
        models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # <|endoftext|> is already in the vocab (50256): registering it only marks it special so the text
    # "<|endoftext|>" encodes to one id. The whitespace runs are new ids, appended in list order.
    tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    tok.add_tokens([AddedToken(ws, special=False, normalized=True) for ws in PHI_ADDED_TOKENS])
    added_ids = {ws: tok.token_to_id(ws) for ws in PHI_ADDED_TOKENS}
    assert list(added_ids.values()) == list(range(GPT2_VOCAB_SIZE, GPT2_VOCAB_SIZE + len(PHI_ADDED_TOKENS)))

    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "vocab.json", vocab)
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merge_lines) + "\n", encoding="utf-8")
    _write_json(out_dir / "added_tokens.json", added_ids)
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    _write_json(out_dir / "special_tokens_map.json", special)
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": _added_tokens_decoder(tok),
        **special,
        # The Hub's file says true; false here because this project's decode never cleans up spaces,
        # so transformers' default decode of these files then agrees with ours.
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "return_token_type_ids": False,
        "tokenizer_class": "CodeGenTokenizer",
    }
    _write_json(out_dir / "tokenizer_config.json", config)


# Phi-3's added tokens eat the whitespace after them (rstrip), as the Hub's tokenizer.json says, except these; the
# GGUF file does not record it.
_PHI3_NO_RSTRIP = ("<unk>", "<s>", EOT)


def write_phi3_tokenizer(out_dir: Path, gguf_path: Path, chat_template: Optional[str] = None,
                         model_max_length: int = 131072) -> None:
    """Write Phi-3's (and Phi-3.5's) tokenizer.json and tokenizer_config.json into `out_dir`, built from the
    SentencePiece vocabulary in llama.cpp's `ggml-vocab-phi-3.gguf` (or a Phi-3 model's GGUF file; `.xz`
    compressed works too).

    The shape is the Hub's: a BPE over SentencePiece pieces with byte fallback, a normalizer that prepends "▁" and
    spells spaces as "▁" (applied to each piece of text between added tokens), and added tokens <unk>, <s>, </s>
    and <|endoftext|>, <|assistant|>, ..., <|user|> at the ids the GGUF gives. The merges are the vocabulary's
    pairs, best-scored result first, as transformers derives them from a SentencePiece model.
    """
    tokens, scores, types = _read_gguf_vocab(Path(gguf_path))
    normal = [i for i, t in enumerate(types) if t in (1, 6)]  # NORMAL pieces and the <0xXX> byte pieces
    # the SentencePiece model's pieces (<unk>, <s>, </s> and the normal and byte ones); the ids above them are
    # transformers' added tokens and the model's padding
    vocab = {tokens[i]: i for i in range(normal[-1] + 1)}
    merges = []
    for i in normal:
        piece = tokens[i]
        pairs = [(vocab[piece[:k]], vocab[piece[k:]]) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(-scores[i], a, b) for a, b in pairs]
    merges.sort()  # best score first; ties by the ids of the two parts
    added = [(i, AddedToken(tokens[i], special=types[i] == 3, normalized=False,
                            rstrip=tokens[i] not in _PHI3_NO_RSTRIP))
             for i, t in enumerate(types) if t in (3, 4)]  # CONTROL (special) and USER_DEFINED (</s>)
    tok = HFTokenizer(models.BPE(_with_added(vocab, added), [(tokens[a], tokens[b]) for _, a, b in merges],
                                 unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    _register_added(tok, added)
    config = {"add_bos_token": False, "add_eos_token": False, "bos_token": "<s>", "eos_token": EOT,
              "pad_token": EOT, "unk_token": "<unk>", "legacy": False, "model_max_length": model_max_length}
    _save_tokenizer(tok, out_dir, config, chat_template)


def _phi4_added() -> dict[int, str]:
    """phi-4's added tokens: ids 100256..100351, the unused ones named <|dummy_0|>, <|dummy_1|>, ... in id order."""
    named = {100257: EOT, 100258: "<|fim_prefix|>", 100259: "<|fim_middle|>", 100260: "<|fim_suffix|>",
             100264: "<|im_start|>", 100265: "<|im_end|>", 100266: "<|im_sep|>", 100276: "<|endofprompt|>"}
    unused = [i for i in range(100256, 100352) if i not in named]
    return {**named, **{i: f"<|dummy_{k}|>" for k, i in enumerate(unused)}}


# What phi-4 and Phi-4-mini add to tiktoken's ranks (all special tokens), and their tokenizer_config.json values.
# Phi-4-mini leaves the ids between its tokens empty, as o200k_base does.
TIKTOKEN_FAMILIES = {
    "phi-4": {
        "ranks": "cl100k_base",
        "added": _phi4_added(),
        "config": {"bos_token": EOT, "eos_token": "<|im_end|>", "pad_token": "<|dummy_85|>", "model_max_length": 16384},
    },
    "phi-4-mini": {
        "ranks": "o200k_base",
        "added": {199999: EOT, 200018: "<|endofprompt|>", 200019: "<|assistant|>", 200020: "<|end|>",
                  200021: "<|user|>", 200022: "<|system|>", 200023: "<|tool|>", 200024: "<|/tool|>",
                  200025: "<|tool_call|>", 200026: "<|/tool_call|>", 200027: "<|tool_response|>", 200028: "<|tag|>"},
        "config": {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT, "unk_token": EOT, "model_max_length": 131072},
    },
}


def write_tiktoken_tokenizer(out_dir: Path, ranks_path: Path, family: str = "phi-4",
                             chat_template: Optional[str] = None) -> None:
    """Write phi-4's or Phi-4-mini's tokenizer.json and tokenizer_config.json into `out_dir`, built from tiktoken's
    ranks in js-tiktoken's file (`dist/ranks/cl100k_base.js` for phi-4, `o200k_base.js` for Phi-4-mini; `.xz`
    compressed works too).

    A byte-level BPE as transformers converts tiktoken ranks: the ranks' split regex, then GPT-2's byte alphabet; a
    token's id is its rank; the merges are every way to build a token from two shorter ones, ordered by the rank
    of the result; a word that is a token needs no merges (tiktoken's rule). The family's added tokens (all
    special) take their ids.
    """
    if family not in TIKTOKEN_FAMILIES:
        raise UserError(f"unknown tiktoken family {family!r}; choose one of {', '.join(TIKTOKEN_FAMILIES)}")
    spec = TIKTOKEN_FAMILIES[family]
    ranks, pattern = read_tiktoken_ranks(Path(ranks_path))
    if len(ranks) != {"cl100k_base": 100256, "o200k_base": 199998}[spec["ranks"]]:
        raise UserError(f"{ranks_path} holds {len(ranks)} ranks, not {spec['ranks']}'s; {family} is built on those")
    spell = _bytes_to_unicode()
    merges = []
    for token, rank in ranks.items():
        pairs = [(ranks[token[:k]], ranks[token[k:]], token[:k], token[k:]) for k in range(1, len(token))
                 if token[:k] in ranks and token[k:] in ranks]
        merges += [(rank, *pair) for pair in pairs]
    merges.sort()  # by the rank of the result, then the ranks of the two parts

    def spelled(token: bytes) -> str:
        return "".join(spell[b] for b in token)

    vocab = {spelled(token): rank for token, rank in ranks.items()}
    added = [(i, AddedToken(t, special=True, normalized=False)) for i, t in spec["added"].items()]
    tok = HFTokenizer(models.BPE(_with_added(vocab, added), [(spelled(a), spelled(b)) for *_, a, b in merges],
                                 fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    _register_added(tok, added)
    _save_tokenizer(tok, out_dir, {"add_bos_token": False, "add_eos_token": False, **spec["config"]}, chat_template)


# js-tiktoken spells tiktoken's case-insensitive contractions (?i:'s|'t|...) case by case; written back as tiktoken
# (and transformers) have them, so that the regex also folds case beyond ASCII as theirs does
_JS_CONTRACTIONS = "('s|'S|'t|'T|'re|'rE|'Re|'RE|'ve|'vE|'Ve|'VE|'m|'M|'ll|'lL|'Ll|'LL|'d|'D)"


def read_tiktoken_ranks(path: Path) -> tuple[dict[bytes, int], str]:
    """The ranks (token bytes -> rank) and the split regex of a js-tiktoken ranks file (.js, .cjs or .json).

    Its "bpe_ranks" is lines of "<anything> <first rank> <base64 token> <base64 token> ...", consecutive ranks.
    """
    text = _read_maybe_compressed(path).decode("utf-8")
    try:
        data = json.loads(text[text.index("{"):text.rindex("}") + 1])
        ranks = {}
        for line in data["bpe_ranks"].split("\n"):
            if line:
                _, first, *tokens = line.split(" ")
                ranks.update((base64.b64decode(t, validate=True), int(first) + k) for k, t in enumerate(tokens))
        pattern = data["pat_str"].replace(_JS_CONTRACTIONS, "(?i:'s|'t|'re|'ve|'m|'ll|'d)")
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a js-tiktoken ranks file ({first_line(e)})")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path} is not a js-tiktoken ranks file (its ranks are not 0..{len(ranks) - 1})")
    return ranks, pattern


def _read_gguf_vocab(path: Path) -> tuple[list[str], list[float], list[int]]:
    """The tokens, scores and token types (1 normal, 3 control, 4 user-defined, 6 byte) of a GGUF file's
    SentencePiece vocabulary."""
    from gguf import GGUFReader  # only here: reading GGUF files is the only use of the gguf package in this module

    with tempfile.TemporaryDirectory() as tmp:
        if path.suffix in (".xz", ".gz"):  # GGUFReader memory-maps a plain file
            plain = Path(tmp) / path.stem
            plain.write_bytes(_read_maybe_compressed(path))
        else:
            plain = path
        try:
            fields = GGUFReader(plain).fields
            values = [fields[f"tokenizer.ggml.{key}"].contents() for key in ("tokens", "scores", "token_type")]
            model = fields["tokenizer.ggml.model"].contents()
        except (OSError, ValueError, KeyError, IndexError) as e:  # what numpy raises on a cut or foreign file
            raise UserError(f"cannot read a tokenizer from {path} ({first_line(e)}); it needs a GGUF file with one")
    if model != "llama" or len(set(map(len, values))) != 1:
        raise UserError(f"{path} holds no SentencePiece vocabulary (tokenizer model {model!r}), which Phi-3 has")
    return values[0], values[1], values[2]


def _read_maybe_compressed(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        if path.suffix == ".xz":
            return lzma.decompress(data)
        if path.suffix == ".gz":
            import gzip

            return gzip.decompress(data)
        return data
    except (OSError, lzma.LZMAError, EOFError) as e:
        raise UserError(f"cannot read {path} ({first_line(e)})")


def _with_added(vocab: dict[str, int], added: Sequence[tuple[int, AddedToken]]) -> dict[str, int]:
    """The model's vocabulary with the added tokens at their ids. tokenizers numbers the tokens it adds itself,
    after the vocabulary, so ids that leave gaps (Phi-4-mini's) are only kept by the vocabulary."""
    return {**vocab, **{t.content: i for i, t in added}}


def _register_added(tok: HFTokenizer, added: Sequence[tuple[int, AddedToken]]) -> None:
    """Make the added tokens whole tokens of the text (matched before the normalizer and the split)."""
    tok.add_special_tokens([t for _, t in added if t.special])
    tok.add_tokens([t for _, t in added if not t.special])
    wrong = [(i, t.content) for i, t in added if tok.token_to_id(t.content) != i]
    assert not wrong, f"added tokens landed elsewhere: {wrong[:3]}"


def _save_tokenizer(tok: HFTokenizer, out_dir: Path, config: dict, chat_template: Optional[str]) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "added_tokens_decoder": _added_tokens_decoder(tok),
        **config,
        "clean_up_tokenization_spaces": False,  # this project's decode never cleans up spaces
        # The Hub's files name LlamaTokenizer (Phi-3) or GPT2Tokenizer (phi-4), whose transformers 5 classes
        # rebuild the normalizer and pre-tokenizer their own way; this class takes tokenizer.json as it is.
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    _write_json(out_dir / "tokenizer_config.json", config)


def _added_tokens_decoder(tok: HFTokenizer) -> dict:
    """tokenizer_config.json's "added_tokens_decoder": every added token by id, with its flags."""
    return {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(tok.get_added_tokens_decoder().items())}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class Tokenizer:
    """The tokenizer stored in a checkpoint directory (its tokenizer.json plus optional config files)."""

    def __init__(self, checkpoint_dir: Path) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
            raise UserError(f"{checkpoint_dir} is a file, not a checkpoint directory")
        if not checkpoint_dir.is_dir():
            raise NeedsStep(f"checkpoint directory {checkpoint_dir} does not exist; get the tokenizer",
                            "download_tokenizer", checkpoint_dir)
        path = checkpoint_dir / "tokenizer.json"
        if not path.is_file():
            raise NeedsStep(f"{checkpoint_dir} has no tokenizer.json; get it", "download_tokenizer", checkpoint_dir)
        try:
            self.processor = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise NeedsStep(f"cannot read {path} ({first_line(e)}); download it again", "download_tokenizer",
                            checkpoint_dir)
        self.checkpoint_dir = checkpoint_dir
        config = _read_json(checkpoint_dir / "tokenizer_config.json")
        # what a chat template sees as bos_token, eos_token, ... (transformers passes the same strings)
        self.special_tokens = special_token_strings(checkpoint_dir, config)
        self.bos_id, self.eos_ids = self._special_ids(_read_json(checkpoint_dir / "generation_config.json"))
        self.eos_id = self.eos_ids[0] if self.eos_ids else None  # the canonical one (the first listed)
        self.chat_template = chat_template_of(checkpoint_dir, config)
        self._size: Optional[int] = None
        self._stream_table: Optional[tuple] = None  # built on the first stream_decoder() call

    def _special_ids(self, gen: dict) -> tuple[Optional[int], tuple[int, ...]]:
        """bos and every eos id. generation_config.json holds what generation really uses (eos may be a list), so
        it wins over tokenizer_config.json's bos_token / eos_token."""
        found: dict[str, tuple[int, ...]] = {}
        for key in ("bos", "eos"):
            value = gen.get(f"{key}_token_id")
            values = value if isinstance(value, list) else [] if value is None else [value]
            if any(not isinstance(v, int) or isinstance(v, bool) for v in values):
                path = self.checkpoint_dir / "generation_config.json"
                raise UserError(f"{path} has a non-integer {key}_token_id {value!r}; fix or delete that file")
            token = self.special_tokens.get(f"{key}_token")
            if not values and token is not None:
                values = [self.processor.token_to_id(token)]
                if values[0] is None:
                    raise NeedsStep(
                        f"{self.checkpoint_dir / 'tokenizer_config.json'} names {key}_token {token!r}, which "
                        f"tokenizer.json lacks; download the tokenizer again", "download_tokenizer", self.checkpoint_dir
                    )
            found[key] = tuple(dict.fromkeys(values))
        return (found["bos"][0] if found["bos"] else None), found["eos"]

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, gaps between added tokens included (50295 for Phi; the model's
        embedding has 51200 rows)."""
        if self._size is None:
            self._size = max(self.processor.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        return self._size

    def token_to_id(self, token: str) -> Optional[int]:
        return self.processor.token_to_id(token)

    def special_ids(self, texts: Sequence[str]) -> list[int]:
        """The ids of those `texts` that are special tokens of this tokenizer ("<|end|>", "<|im_end|>", ...)."""
        special = {t.content: i for i, t in self.processor.get_added_tokens_decoder().items() if t.special}
        return [special[t] for t in texts if t in special]

    def encode(
        self, text: str, bos: bool = False, eos: bool = False, device: Optional[torch.device] = None
    ) -> torch.Tensor:
        """Token ids of `text` as a 1-D int64 tensor. Phi was trained without a leading bos, hence the default.

        Special tokens written in the text ("<|user|>") become their ids, as in transformers.
        """
        ids = self.processor.encode(text, add_special_tokens=False).ids
        if bos:
            if self.bos_id is None:
                raise UserError(f"the tokenizer in {self.checkpoint_dir} defines no bos token; encode without bos")
            ids = [self.bos_id] + ids
        if eos:
            if self.eos_id is None:
                raise UserError(f"the tokenizer in {self.checkpoint_dir} defines no eos token; encode without eos")
            ids = ids + [self.eos_id]
        return torch.tensor(ids, dtype=torch.int64, device=device)

    def decode(self, ids: Union[torch.Tensor, list[int]]) -> str:
        """Text of `ids`, exactly: special tokens are kept as text ("<|endoftext|>") and spaces are never cleaned up.

        Equals transformers' `decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)`.
        Invalid UTF-8 becomes U+FFFD; ids the tokenizer does not know (the model's padded rows 50295..51199) are
        dropped, both as `tokenizers` does.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.processor.decode(ids, skip_special_tokens=False)

    def stream_decoder(self) -> Union["StreamDecoder", "ByteFallbackStreamDecoder"]:
        """A fresh decoder for printing generated tokens one at a time: `add(id)` returns the text that became
        printable, `flush()` the rest. Their concatenation equals `decode` of all ids."""
        if self._stream_table is None:
            self._stream_table = self._build_stream_table()
        kind, table, strip = self._stream_table
        return StreamDecoder(table) if kind == "bytes" else ByteFallbackStreamDecoder(table, strip)

    def _build_stream_table(self) -> tuple[str, list, int]:
        # Streaming relies on knowing each id's exact contribution, which the decoder defines: bytes for
        # byte-level BPE (GPT-2, Phi, phi-4), a byte or a piece of text for SentencePiece with byte fallback (Phi-3).
        decoder = json.loads(self.processor.decoder.__getstate__()) if self.processor.decoder else {}
        if decoder.get("type") == "ByteLevel":
            return "bytes", self._byte_level_table(), 0
        steps = _byte_fallback_steps(decoder)
        if steps is None:
            raise NeedsStep(
                f"streaming needs a byte-level BPE or a SentencePiece BPE with byte fallback (as the Phi models have), "
                f"but {self.checkpoint_dir / 'tokenizer.json'} has decoder {decoder.get('type')!r}; download the "
                f"model's own tokenizer", "download_tokenizer", self.checkpoint_dir
            )
        replace, byte_fallback, strip = steps
        pieces: list[Union[None, int, str]] = [None] * self.vocab_size  # None: a hole in the ids, decode drops it
        for token, i in self.processor.get_vocab(with_added_tokens=True).items():
            if byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
                pieces[i] = int(token[3:5], 16)
                continue
            for old, new in replace:
                token = token.replace(old, new)
            pieces[i] = token
        return "pieces", pieces, strip

    def _byte_level_table(self) -> list[bytes]:
        char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        alphabet, to_latin1 = frozenset(char_to_byte), str.maketrans({c: chr(b) for c, b in char_to_byte.items()})
        table = [b""] * self.vocab_size  # b"": a hole in the id space, which decode() drops
        for token, i in self.processor.get_vocab(with_added_tokens=True).items():
            # Same rule as the ByteLevel decoder in `tokenizers`: a token with any char outside the byte-level
            # alphabet (Phi's added space/tab runs) is taken as plain UTF-8 text.
            table[i] = token.translate(to_latin1).encode("latin-1") if alphabet.issuperset(token) else token.encode()
        return table


def _byte_fallback_steps(decoder: dict) -> Optional[tuple[list[tuple[str, str]], bool, int]]:
    """Llama's SentencePiece decoder, Sequence[Replace("▁", " "), ByteFallback, Fuse, Strip(" ", n, 0)], as
    (replacements, byte fallback, leading spaces stripped); None for any other decoder."""
    steps = decoder.get("decoders") if decoder.get("type") == "Sequence" else [decoder]
    replace, byte_fallback, fused, strip = [], False, False, 0
    for step in steps or ():
        kind = step.get("type")
        if kind == "Replace" and not byte_fallback and isinstance(step.get("pattern", {}).get("String"), str):
            replace.append((step["pattern"]["String"], step.get("content", "")))
        elif kind == "ByteFallback" and not fused:
            byte_fallback = True
        elif kind == "Fuse":
            fused = True
        elif kind == "Strip" and fused and step.get("content") == " " and step.get("stop") == 0 and not strip:
            strip = int(step.get("start", 0))
        else:
            return None
    return (replace, byte_fallback, strip) if steps else None


class StreamDecoder:
    """Turns the ids of a byte-level BPE into text one id at a time, never emitting a partial UTF-8 character.

    An emoji or CJK char is often split over 2-4 byte-level tokens; `add` returns "" until it is complete.
    Concatenating every `add` result and the final `flush` equals `Tokenizer.decode` of all ids, byte for byte.
    Each step costs O(len(token)): the id's bytes go through an incremental UTF-8 decoder, which holds at most
    3 pending bytes, instead of re-decoding the history.
    """

    def __init__(self, id_bytes: list[bytes]) -> None:
        self._id_bytes = id_bytes
        # errors="replace" with maximal-subpart substitution, the same U+FFFDs as Rust's from_utf8_lossy
        # that `tokenizers` applies to invalid byte sequences.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """Feed one id; return the text that became printable (possibly "")."""
        token_id = int(token_id)  # also accepts a 0-d tensor straight from sampling
        data = self._id_bytes[token_id] if 0 <= token_id < len(self._id_bytes) else b""
        return self._utf8.decode(data)

    def flush(self) -> str:
        """End of generation: return what is pending (an unfinished char becomes U+FFFD) and reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


class ByteFallbackStreamDecoder:
    """Turns the ids of a SentencePiece BPE with byte fallback (Phi-3's) into text one id at a time.

    A piece is text ("▁Hello" -> " Hello"); a character outside the vocabulary comes as a run of byte pieces
    (<0xF0><0x9F><0x98><0x80>). `tokenizers` decodes a run whole: its text if it is valid UTF-8, else one U+FFFD
    per byte, so a run is held until a text piece (or the end) closes it; that also keeps partial characters from
    being printed. The decoder strips the first space of the output (the one the normalizer prepended). Together,
    every `add` result and the final `flush` equal `Tokenizer.decode` of all ids.
    """

    def __init__(self, pieces: list[Union[None, int, str]], strip: int) -> None:
        self._pieces, self._strip = pieces, strip
        self._run = bytearray()  # byte pieces not closed yet
        self._to_strip = strip  # leading spaces still to strip from the output

    def add(self, token_id: int) -> str:
        """Feed one id; return the text that became printable (possibly "")."""
        token_id = int(token_id)
        piece = self._pieces[token_id] if 0 <= token_id < len(self._pieces) else None
        if piece is None:  # an id the tokenizer does not know: decode drops it, without closing a run
            return ""
        if isinstance(piece, int):
            self._run.append(piece)
            return ""
        return self._emit(self._close_run() + piece)

    def flush(self) -> str:
        """End of generation: return what is pending and reset."""
        text = self._emit(self._close_run())
        self._to_strip = self._strip
        return text

    def _close_run(self) -> str:
        run, self._run = bytes(self._run), bytearray()
        try:
            return run.decode("utf-8")
        except UnicodeDecodeError:
            return "\ufffd" * len(run)

    def _emit(self, text: str) -> str:
        if self._to_strip and text:
            n = min(self._to_strip, len(text) - len(text.lstrip(" ")))
            text = text[n:]
            self._to_strip = 0 if text else self._to_strip - n
        return text


def special_token_strings(checkpoint_dir: Path, config: Optional[dict] = None) -> dict[str, str]:
    """bos_token, eos_token, ... as strings, from tokenizer_config.json, else special_tokens_map.json: what
    transformers hands a chat template."""
    checkpoint_dir = Path(checkpoint_dir)
    config = _read_json(checkpoint_dir / "tokenizer_config.json") if config is None else config
    fallback = _read_json(checkpoint_dir / "special_tokens_map.json")
    found = {}
    for key in SPECIAL_TOKEN_KEYS:
        token = config.get(key, fallback.get(key))
        if isinstance(token, dict):  # serialized AddedToken: {"content": "<|endoftext|>", ...}
            token = token.get("content")
        if isinstance(token, str):
            found[key] = token
    return found


def chat_template_of(checkpoint_dir: Path, config: Optional[dict] = None) -> Optional[str]:
    """The checkpoint's own chat template: chat_template.jinja (where newer transformers save it), else
    tokenizer_config.json's "chat_template" (a string, or named templates of which "default" is taken); None if
    it has none."""
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / "chat_template.jinja"
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise NeedsStep(f"cannot read {path} ({first_line(e)}); fix or delete it, or download it again",
                            "download_tokenizer", checkpoint_dir)
    config = _read_json(checkpoint_dir / "tokenizer_config.json") if config is None else config
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise NeedsStep(f"cannot parse {path} ({e}); fix or delete it, or download it again", "download_tokenizer",
                        path.parent)
    if not isinstance(data, dict):
        raise NeedsStep(f"{path} is not a JSON object; fix or delete it, or download it again", "download_tokenizer",
                        path.parent)
    return data


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable char table: printable Latin-1 bytes map to themselves, the rest to 256+."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
