"""Training data: a folder of text or code files -> a tokenizer -> memory-mapped token files -> batches.

- `select_files`: the files under a folder with the chosen extensions, minus exclude patterns, in a fixed order.
- `split_files`: train / validation by file, from a hash of each file's relative path (the same split on any
  machine, whatever order the files are listed in, and independent of the other files).
- `train_tokenizer`: a byte-level BPE trained with the `tokenizers` library, `<|endoftext|>` as eos.
- `tokenize_split`: every file encoded once, eos after each, into a uint16/uint32 file that is memory-mapped
  for training. Reused while the files and the tokenizer are unchanged.
- `batch_offsets` / `get_batch`: the windows of each step, drawn from a generator seeded by (seed, step), so a
  resumed run and a run on more processes see exactly the same data at the same step.
"""

import fnmatch
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from lit_gpt.utils import UserError, atomic_path

EOS = "<|endoftext|>"
TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclass
class Corpus:
    """The files a run trains and validates on (paths relative to `root`), and what was skipped."""

    root: Path
    train: list[str]
    val: list[str]

    def fingerprint(self) -> str:
        """A hash of the file list (relative paths and sizes): two runs with the same one saw the same data."""
        h = hashlib.sha256()
        for split, names in (("train", self.train), ("val", self.val)):
            for name in names:
                h.update(f"{split}\0{name}\0{(self.root / name).stat().st_size}\n".encode())
        return h.hexdigest()


def select_files(data_dir: Path, extensions: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """Relative POSIX paths of the files under `data_dir` whose suffix is one of `extensions` and that match
    no `exclude` glob (fnmatch on the relative path: "test/*" or "*/tests/*"), sorted."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        what = "is not a directory" if data_dir.exists() else "does not exist"
        raise UserError(f"data directory {data_dir} {what}")
    wanted = tuple(e if e.startswith(".") else f".{e}" for e in extensions)
    found = []
    for dirpath, dirnames, filenames in os.walk(data_dir, onerror=_raise_walk_error):
        dirnames.sort()
        for name in filenames:
            if name.endswith(wanted):
                rel = Path(dirpath, name).relative_to(data_dir).as_posix()
                if not any(fnmatch.fnmatch(rel, pattern) for pattern in exclude):
                    found.append(rel)
    if not found:
        raise UserError(f"no files with extension {', '.join(wanted)} under {data_dir}"
                        f"{' (after the exclude patterns)' if exclude else ''}")
    return sorted(found)


def _raise_walk_error(e: OSError) -> None:
    raise UserError(f"cannot read {e.filename} ({e.strerror})")


def split_files(files: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, val): a file goes to validation when the hash of its relative path falls below
    `val_fraction`. Each split gets at least one file (the file with the lowest hash goes to validation)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(files) < 2:
        raise UserError(f"found only {len(files)} file; training needs at least two (one for validation)")

    def rank(name: str) -> float:
        return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64

    ranked = sorted(files, key=rank)
    n_val = min(max(1, sum(rank(f) < val_fraction for f in files)), len(files) - 1)
    val = set(ranked[:n_val])
    return [f for f in files if f not in val], [f for f in files if f in val]


def read_text(path: Path) -> Optional[str]:
    """The file as text, or None where it is binary (a NUL byte) or not UTF-8."""
    data = Path(path).read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def iter_texts(root: Path, names: Sequence[str], skipped: Optional[list[str]] = None) -> Iterator[str]:
    """The texts of the files, in order; binary or undecodable files are left out (and named in `skipped`)."""
    for name in names:
        text = read_text(Path(root) / name)
        if text is None:
            if skipped is not None:
                skipped.append(name)
            continue
        yield text


def train_tokenizer(root: Path, names: Sequence[str], vocab_size: int, out_dir: Path) -> Path:
    """Train a byte-level BPE (GPT-2's pre-tokenization, `<|endoftext|>` as eos, bos and unk) on the files and
    write tokenizer.json + tokenizer_config.json into `out_dir`, which transformers' AutoTokenizer and our
    Tokenizer load. The vocabulary holds the 256 byte symbols, the merges and the special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (the 256 bytes and {EOS}), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter_texts(root, names), trainer=trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "tokenizer.json") as tmp:
        tokenizer.save(str(tmp))
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": EOS, "eos_token": EOS, "unk_token": EOS,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
    }
    with atomic_path(out_dir / TOKENIZER_CONFIG) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    """A hash of tokenizer.json: two runs with the same one encode text to the same ids."""
    return hashlib.sha256((Path(tokenizer_dir) / "tokenizer.json").read_bytes()).hexdigest()


def tokenize_split(root: Path, names: Sequence[str], tokenizer_dir: Path, out_path: Path) -> tuple[np.ndarray, int]:
    """Encode the files (eos after each) into `out_path` and return it memory-mapped, with how many files
    were skipped as binary or undecodable. A file made earlier from the same files and tokenizer is reused."""
    from tokenizers import Tokenizer

    out_path = Path(out_path)
    meta_path = out_path.with_suffix(".json")
    h = hashlib.sha256(tokenizer_fingerprint(tokenizer_dir).encode())
    for name in names:
        stat = (Path(root) / name).stat()
        h.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    key = h.hexdigest()
    meta = _read_meta(meta_path)
    if meta.get("key") == key and out_path.is_file():
        return _open_tokens(out_path, meta), meta["skipped"]

    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    eos = tokenizer.token_to_id(EOS)
    if eos is None:
        raise UserError(f"the tokenizer in {tokenizer_dir} has no {EOS} token, which separates the files")
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    skipped: list[str] = []
    count = 0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp, open(tmp, "wb") as f:
        texts = iter_texts(root, names, skipped)
        while True:
            chunk = [t for _, t in zip(range(64), texts)]
            if not chunk:
                break
            for encoding in tokenizer.encode_batch(chunk, add_special_tokens=False):
                ids = np.asarray(encoding.ids + [eos], dtype=dtype)
                f.write(ids.tobytes())
                count += len(ids)
        f.flush()
        os.fsync(f.fileno())
    meta = {"key": key, "dtype": np.dtype(dtype).name, "tokens": count, "files": len(names) - len(skipped),
            "skipped": len(skipped)}
    with atomic_path(meta_path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    return _open_tokens(out_path, meta), len(skipped)


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


def _open_tokens(path: Path, meta: dict) -> np.ndarray:
    if meta["tokens"] == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["tokens"],))


def batch_offsets(n_tokens: int, block_size: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Start offsets of the `batch_size` windows of `block_size + 1` tokens used at `step`: a function of
    (seed, step) alone, so resuming at a step or splitting the batch over processes changes nothing."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n_tokens - block_size, (batch_size,), generator=generator)


def get_batch(tokens: np.ndarray, offsets: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (len(offsets), block_size) int64: targets are the inputs shifted by one."""
    rows = np.stack([tokens[o:o + block_size + 1] for o in offsets.tolist()]).astype(np.int64)
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]


def val_offsets(n_tokens: int, block_size: int, max_windows: Optional[int] = None) -> list[int]:
    """Non-overlapping windows from the start of the validation tokens (all of them, or the first few)."""
    offsets = list(range(0, n_tokens - block_size, block_size))
    return offsets if max_windows is None else offsets[:max_windows]
