import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from lit_gpt.cli import error_line
from lit_gpt.tokenizer import GPT2_BPE_DIR, PHI_ADDED_TOKENS, Tokenizer, write_phi_tokenizer
from lit_gpt.utils import UserError

GPT2_DIR = GPT2_BPE_DIR  # shipped with the package
EOT_ID = 50256

TEXTS = [
    "Hello world",
    "def add(a, b):\n    return a + b\n",
    "class A:\n    def f(self):\n        if x:\n            pass\n\t\treturn\t1\n",
    "x  =  1;   y    = 2" + " " * 40 + "z" + "\t" * 12 + "w",
    "  leading spaces and trailing spaces   ",
    "héllo wörld, ça va? Ünïcödé ñ",
    "Emoji: 👋🏽 🎉👨‍👩‍👧 ❤️",
    "中文：你好，世界！日本語のテキスト。한국어",
    "line one\n\nline two\r\n\n\n  indented\n",
    "Instruct: Write a poem.\nOutput:",
    "text<|endoftext|>more text",
    "Σ∫√∞ ≠ ≤ → ½ ¼ ¥ €",
]


@pytest.fixture(scope="session")
def phi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phi_tokenizer")
    write_phi_tokenizer(out, GPT2_DIR)
    return out


@pytest.fixture(scope="session")
def tokenizer(phi_dir: Path) -> Tokenizer:
    return Tokenizer(phi_dir)


@pytest.fixture(scope="session")
def hf_tokenizer(phi_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(phi_dir)


def tokenizer_copy(phi_dir: Path, dst: Path) -> Path:
    """A checkpoint dir holding only tokenizer.json, so a test controls which config files exist."""
    dst.mkdir()
    shutil.copy(phi_dir / "tokenizer.json", dst / "tokenizer.json")
    return dst


def test_written_files(phi_dir: Path, tokenizer: Tokenizer) -> None:
    names = {p.name for p in phi_dir.iterdir()}
    expected = {"tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json"}
    assert expected | {"tokenizer_config.json"} <= names
    config = json.loads((phi_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "CodeGenTokenizer"
    assert config["bos_token"] == config["eos_token"] == config["unk_token"] == "<|endoftext|>"
    assert config["model_max_length"] == 2048 and config["add_prefix_space"] is False
    added = json.loads((phi_dir / "added_tokens.json").read_text())
    assert added[" " * 31] == 50257 and added["  "] == 50286 and added["\t" * 9] == 50287 and added["\t\t"] == 50294
    assert len(added) == 38 == len(PHI_ADDED_TOKENS)
    assert len(json.loads((phi_dir / "vocab.json").read_text())) == 50257
    assert tokenizer.vocab_size == 50295
    assert tokenizer.bos_id == tokenizer.eos_id == EOT_ID


def test_known_ids(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Hello world")
    assert ids.dtype == torch.int64 and ids.ndim == 1
    assert ids.tolist() == [15496, 995]  # no bos by default
    assert tokenizer.encode("How are you doing?").tolist() == [2437, 389, 345, 1804, 30]
    assert tokenizer.encode("Hello world", bos=True, eos=True).tolist() == [EOT_ID, 15496, 995, EOT_ID]
    assert tokenizer.encode("<|endoftext|>").tolist() == [EOT_ID]


def test_whitespace_tokens(tokenizer: Tokenizer) -> None:
    code = "def f():\n    x = 1\n        y = 2\n\t\tz  = 3\n"
    ids = tokenizer.encode(code).tolist()
    # n spaces -> 50257 + 31 - n, n tabs -> 50287 + 9 - n
    assert 50284 in ids  # 4 spaces
    assert 50280 in ids  # 8 spaces
    assert 50294 in ids  # 2 tabs
    assert 50286 in ids  # 2 spaces
    assert tokenizer.decode(ids) == code
    assert tokenizer.decode(torch.tensor(ids)) == code
    # a run longer than 31 spaces splits into the longest added run first
    assert tokenizer.encode(" " * 33 + "a").tolist()[0] == 50257


@pytest.mark.parametrize("text", TEXTS)
def test_matches_transformers(tokenizer: Tokenizer, hf_tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).tolist()
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    expected = hf_tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert tokenizer.decode(ids) == expected == text


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    decoder = tokenizer.stream_decoder()
    return [decoder.add(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decode_is_exact(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).tolist()
    pieces = stream(tokenizer, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == text


def test_stream_holds_split_characters(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a👋b").tolist()
    # the emoji's 4 UTF-8 bytes are spread over several tokens, so the test is not vacuous
    emoji_ids = tokenizer.encode("👋").tolist()
    assert len(emoji_ids) >= 2
    pieces = stream(tokenizer, ids)
    assert "👋" in pieces  # emitted whole, once complete
    assert pieces.count("") >= len(emoji_ids) - 1  # nothing printed while incomplete
    assert "".join(pieces) == "a👋b"
    cjk_ids = tokenizer.encode("界").tolist()
    assert len(cjk_ids) >= 2
    assert stream(tokenizer, cjk_ids) == [""] * (len(cjk_ids) - 1) + ["界", ""]


def test_stream_invalid_bytes_match_decode(tokenizer: Tokenizer) -> None:
    emoji_ids = tokenizer.encode("👋").tolist()
    # generation cut off mid-character, or starting mid-character: flush and decode agree on U+FFFD
    for ids in (emoji_ids[:1], emoji_ids[1:], emoji_ids[:1] + [15496], emoji_ids[1:] + emoji_ids):
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids)
    # ids past the tokenizer (the model's padded rows) are dropped, as decode drops them
    assert "".join(stream(tokenizer, [15496, 51000, 995])) == tokenizer.decode([15496, 51000, 995]) == "Hello world"
    decoder = tokenizer.stream_decoder()
    assert decoder.add(torch.tensor(15496)) == "Hello"  # a 0-d tensor from sampling works too


def test_bos_eos_from_tokenizer_config(phi_dir: Path, tmp_path: Path) -> None:
    ckpt = tokenizer_copy(phi_dir, tmp_path / "ckpt")
    assert (Tokenizer(ckpt).bos_id, Tokenizer(ckpt).eos_id) == (None, None)
    config = {"bos_token": "Hello", "eos_token": {"content": "<|endoftext|>", "special": True}}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer(ckpt)
    assert (tok.bos_id, tok.eos_id) == (15496, EOT_ID)
    assert tok.encode(" world", bos=True).tolist() == [15496, 995]


def test_bos_eos_from_generation_config(phi_dir: Path, tmp_path: Path) -> None:
    ckpt = tokenizer_copy(phi_dir, tmp_path / "ckpt")
    (ckpt / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 3]}))
    tok = Tokenizer(ckpt)
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (1, 2, (2, 3))  # every listed id ends generation
    # generation_config.json wins over tokenizer_config.json
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"bos_token": "Hello", "eos_token": "Hello"}))
    tok = Tokenizer(ckpt)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    # ...but only for the ids it actually gives
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": 50256}))
    tok = Tokenizer(ckpt)
    assert (tok.bos_id, tok.eos_id) == (15496, EOT_ID)


def test_missing_tokenizer_is_user_error(phi_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        Tokenizer(tmp_path / "checkpoints" / "microsoft" / "phi-2")
    # the command line adds the command that fixes it
    assert re.search("scripts/download.py --repo_id microsoft/phi-2 --tokenizer_only True", error_line(e.value))
    assert "\n" not in error_line(e.value)
    with pytest.raises(UserError) as e:
        Tokenizer(tmp_path)
    assert re.search("no tokenizer.json.*scripts/download.py", error_line(e.value))
    ckpt = tokenizer_copy(phi_dir, tmp_path / "ckpt")
    (ckpt / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer_config.json"):
        Tokenizer(ckpt)
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(UserError, match="lacks"):
        Tokenizer(ckpt)


def test_chat_template_and_special_tokens(phi_dir: Path, tmp_path: Path) -> None:
    """What a chat template needs from the checkpoint, found where transformers finds it."""
    ckpt = tokenizer_copy(phi_dir, tmp_path / "ckpt")
    assert Tokenizer(ckpt).chat_template is None and Tokenizer(ckpt).special_tokens == {}
    (ckpt / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|endoftext|>", "pad_token": "x"}))
    config = {"chat_template": "{{ messages }}", "eos_token": {"content": "<|endoftext|>", "special": True},
              "pad_token": None}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer(ckpt)
    assert tok.chat_template == "{{ messages }}"
    assert tok.special_tokens == {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    named = [{"name": "tool_use", "template": "A"}, {"name": "default", "template": "B"}]
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert Tokenizer(ckpt).chat_template == "B"
    (ckpt / "chat_template.jinja").write_text("C", encoding="utf-8")  # where transformers 4.43+ saves it
    assert Tokenizer(ckpt).chat_template == "C"
