"""Phi's tokenizer (CodeGen = GPT-2 byte-level BPE + 38 whitespace tokens): load, encode, decode, stream.

The heavy lifting is done by the `tokenizers` library reading the checkpoint's tokenizer.json, so ids match
`transformers` exactly. What this module adds: bos/eos lookup from the Hub's config files, a streaming decoder
that never prints half a UTF-8 character, and `write_phi_tokenizer` to rebuild the tokenizer files offline.
"""

import codecs
import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
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

    def added(content: str, special: bool) -> dict:
        flags = {"lstrip": False, "normalized": not special, "rstrip": False, "single_word": False}
        return {"content": content, **flags, "special": special}

    added_decoder = {str(GPT2_VOCAB_SIZE - 1): added(EOT, True)}
    added_decoder.update({str(i): added(ws, False) for ws, i in added_ids.items()})
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added_decoder,
        **special,
        # The Hub's file says true; false here because this project's decode never cleans up spaces,
        # so transformers' default decode of these files then agrees with ours.
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "return_token_type_ids": False,
        "tokenizer_class": "CodeGenTokenizer",
    }
    _write_json(out_dir / "tokenizer_config.json", config)


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
        self.bos_id, self.eos_id = self._special_ids(checkpoint_dir)
        self._id_bytes: Optional[list[bytes]] = None  # built on the first stream_decoder() call

    def _special_ids(self, checkpoint_dir: Path) -> tuple[Optional[int], Optional[int]]:
        ids: dict[str, Optional[int]] = {"bos": None, "eos": None}
        # generation_config.json holds what generation really uses, so it wins over tokenizer_config.json.
        gen = _read_json(checkpoint_dir / "generation_config.json")
        for key in ids:
            value = gen.get(f"{key}_token_id")
            if isinstance(value, list):  # several eos ids are allowed; the first is the canonical one
                value = value[0] if value else None
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool):
                    path = checkpoint_dir / "generation_config.json"
                    raise UserError(f"{path} has a non-integer {key}_token_id {value!r}; fix or delete that file")
                ids[key] = value
        cfg = _read_json(checkpoint_dir / "tokenizer_config.json")
        for key in ids:
            token = cfg.get(f"{key}_token")
            if isinstance(token, dict):  # serialized AddedToken: {"content": "<|endoftext|>", ...}
                token = token.get("content")
            if ids[key] is None and token is not None:
                ids[key] = self.processor.token_to_id(token)
                if ids[key] is None:
                    raise NeedsStep(
                        f"{checkpoint_dir / 'tokenizer_config.json'} names {key}_token {token!r}, which tokenizer.json"
                        f" lacks; download the tokenizer again", "download_tokenizer", checkpoint_dir
                    )
        return ids["bos"], ids["eos"]

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (50295 for Phi; the model's embedding has 51200 rows)."""
        return self.processor.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.processor.token_to_id(token)

    def encode(
        self, text: str, bos: bool = False, eos: bool = False, device: Optional[torch.device] = None
    ) -> torch.Tensor:
        """Token ids of `text` as a 1-D int64 tensor. Phi was trained without a leading bos, hence the default."""
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
        Bytes that are not valid UTF-8 become U+FFFD; ids the tokenizer does not know (the model's padded
        rows 50295..51199) are dropped, both as `tokenizers` does.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.processor.decode(ids, skip_special_tokens=False)

    def stream_decoder(self) -> "StreamDecoder":
        """A fresh decoder for printing generated tokens one at a time (see `StreamDecoder`)."""
        if self._id_bytes is None:
            self._id_bytes = self._build_id_bytes()
        return StreamDecoder(self._id_bytes)

    def _build_id_bytes(self) -> list[bytes]:
        # Streaming relies on knowing each id's exact bytes, which is only defined for byte-level decoding.
        decoder = json.loads(self.processor.to_str()).get("decoder") or {}
        if decoder.get("type") != "ByteLevel":
            raise NeedsStep(
                f"streaming needs a byte-level BPE tokenizer (like Phi's), but {self.checkpoint_dir / 'tokenizer.json'}"
                f" uses decoder {decoder.get('type')!r}; download the model's own tokenizer", "download_tokenizer",
                self.checkpoint_dir
            )
        char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        table = []
        for i in range(self.vocab_size):
            token = self.processor.id_to_token(i)
            if token is None:  # a hole in the id space: decode() drops such ids, so emit nothing
                table.append(b"")
            elif all(c in char_to_byte for c in token):
                table.append(bytes(char_to_byte[c] for c in token))
            else:
                # Same rule as the ByteLevel decoder in `tokenizers`: a token with any char outside the
                # byte-level alphabet (Phi's added space/tab runs) is taken as plain UTF-8 text.
                table.append(token.encode("utf-8"))
        return table


class StreamDecoder:
    """Turns ids into text one id at a time, never emitting a partial UTF-8 character.

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
