"""The later Phi family's tokenizers, rebuilt offline from their real vocabularies (tests/data, see its README):
Phi-3/3.5 from llama.cpp's GGUF vocabulary against llama.cpp's expected ids, phi-4 and Phi-4-mini from tiktoken's
ranks against transformers' tokenizers converted from the same ranks; decoding and streaming exact for all."""

import base64
import hashlib
import json
import lzma
import random
from pathlib import Path

import pytest

from lit_gpt.tokenizer import GENERATION_IDS, Tokenizer, read_tiktoken_ranks, write_phi3_tokenizer, \
    write_tiktoken_tokenizer
from lit_gpt.utils import UserError

DATA = Path(__file__).resolve().parent / "data"
GGUF = DATA / "llama.cpp" / "ggml-vocab-phi-3.gguf.xz"
RANKS = {"phi-4": DATA / "js-tiktoken" / "cl100k_base.js.xz", "phi-4-mini": DATA / "js-tiktoken" / "o200k_base.js.xz"}

# Building a real vocabulary takes 1-2 s, and transformers' own conversion as long again
pytestmark = pytest.mark.slow


def llama_cpp_cases() -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer tests: inputs separated by "\\n__ggml_vocab_test__\\n", one line of ids each."""
    inputs = (DATA / "llama.cpp" / "ggml-vocab-phi-3.gguf.inp").read_text(encoding="utf-8").split(
        "\n__ggml_vocab_test__\n")[:-1]
    outputs = (DATA / "llama.cpp" / "ggml-vocab-phi-3.gguf.out").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(inputs) == len(outputs) == 46
    return [(text, [int(i) for i in ids.split()]) for text, ids in zip(inputs, outputs)]


TEXTS = [text for text, _ in llama_cpp_cases()] + [
    "def add(a, b):\n    return a + b\n\tpass  \r\n",
    "I'LL be THERE's, they'Re 'ſ 'K",  # tiktoken's case-insensitive contractions, beyond ASCII too
    "naïve café ﬁ ǅ ΣΊΣΥΦΟΣ Ǆemo 1234567 ¼",
    "Emoji: 👋🏽 🎉👨‍👩‍👧 ❤️ and 中文：你好，世界！한국어 ไทย",
    "<|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant<|im_sep|>",
    "<|system|>\nBe brief.<|end|>\n<|user|>\nHello <|end|>  \n<|assistant|>\n",
    "text<|endoftext|>more</s> <s>",
]


def with_generation_config(d: Path, family: str) -> Path:
    (d / "generation_config.json").write_text(json.dumps(GENERATION_IDS[family]))
    return d


@pytest.fixture(scope="module")
def phi3(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("phi-3")
    write_phi3_tokenizer(d, GGUF)
    return with_generation_config(d, "phi-3")


@pytest.fixture(scope="module", params=["phi-4", "phi-4-mini"])
def tiktoken_family(request, tmp_path_factory) -> tuple[str, Path]:
    d = tmp_path_factory.mktemp(request.param)
    write_tiktoken_tokenizer(d, RANKS[request.param], request.param)
    return request.param, with_generation_config(d, request.param)


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    decoder = tokenizer.stream_decoder()
    return [decoder.add(i) for i in ids] + [decoder.flush()]


# --- Phi-3 and Phi-3.5 ---

def test_phi3_gives_llama_cpps_ids(phi3):
    tokenizer = Tokenizer(phi3)
    for text, expected in llama_cpp_cases():
        ids = tokenizer.encode(text).tolist()
        assert ids == expected, text
        assert tokenizer.decode(ids) == text
        assert "".join(stream(tokenizer, ids)) == text


def test_phi3_special_tokens(phi3):
    tokenizer = Tokenizer(phi3)
    ids = {t: tokenizer.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>",
                                                  "<|system|>", "<|end|>", "<|user|>")}
    assert ids == {"<unk>": 0, "<s>": 1, "</s>": 2, "<|endoftext|>": 32000, "<|assistant|>": 32001,
                   "<|system|>": 32006, "<|end|>": 32007, "<|user|>": 32010}
    assert tokenizer.vocab_size == 32011  # the model's 32064 rows include 53 that no token uses
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.eos_ids) == (1, 32000, (32000, 32001, 32007))
    # the chat tokens take the whitespace after them, as on the Hub; what follows gets its own "▁"
    ids = tokenizer.encode("<|user|>\nHello<|end|>\n<|assistant|>\n").tolist()
    assert ids == [32010, 15043, 32007, 32001]
    assert tokenizer.special_ids(["<|end|>", "<|user|>", "</s>", "Instruct:"]) == [32007, 32010]  # </s> is not special


def test_phi3_matches_transformers(phi3, tmp_path):
    """transformers loads the same files to the same ids, and its own GGUF reader builds the same tokenizer."""
    from transformers import AutoTokenizer

    ours, theirs = Tokenizer(phi3), AutoTokenizer.from_pretrained(phi3)
    (tmp_path / "phi-3.gguf").write_bytes(lzma.decompress(GGUF.read_bytes()))
    from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="phi-3.gguf")
    for text in TEXTS:
        ids = ours.encode(text).tolist()
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if "|>" not in text and "</s>" not in text:  # a GGUF does not say which added tokens take the space after
            assert ids == from_gguf.encode(text, add_special_tokens=False), text


def test_phi3_stream_decoding_is_exact(phi3):
    tokenizer = Tokenizer(phi3)
    for text in TEXTS:
        ids = tokenizer.encode(text).tolist()
        pieces = stream(tokenizer, ids)
        assert "".join(pieces) == tokenizer.decode(ids)
        assert all("\ufffd" not in p for p in pieces)
    # a character outside the vocabulary is a run of byte pieces: nothing is printed before it is complete
    rocket = tokenizer.encode("🚀").tolist()
    assert rocket == [29871, 243, 162, 157, 131]
    assert stream(tokenizer, rocket + [15043]) == ["", "", "", "", "", "🚀 Hello", ""]
    # a run that is not valid UTF-8, cut short or broken: one U+FFFD per byte, as tokenizers decodes it; ids past
    # the vocabulary (the model's padding rows) are dropped without breaking a run
    byte = {b: tokenizer.token_to_id(f"<0x{b:02X}>") for b in (0xF0, 0x9F, 0xE4, 0xB8, 0x96, 0xFF)}
    for ids in ([byte[0xF0], byte[0x9F]], [byte[0xE4], byte[0xB8], byte[0x96], byte[0xFF], 15043],
                [byte[0xE4], 32050, byte[0xB8], byte[0x96], 32007, byte[0xFF]], [29871, 29871, 15043], [32050]):
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids), ids
    # any ids at all, as a random model samples them: pieces, byte pieces, chat tokens, padding rows
    rng = random.Random(0)
    pool = [*range(3, 259), *rng.sample(range(259, 32000), 300), *range(32000, 32064), 29871, 259, 13]
    for _ in range(500):
        ids = rng.choices(pool, k=rng.randint(1, 12))
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids), ids
    decoder = tokenizer.stream_decoder()
    assert [decoder.add(i) for i in (259, 15043)] + [decoder.flush()] == [" ", " Hello", ""]  # "▁▁" loses one space
    assert [decoder.add(i) for i in (259, 15043)] == [" ", " Hello"]  # flush started a new text


def test_phi3_source_errors(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        write_phi3_tokenizer(tmp_path / "out", tmp_path / "missing.gguf")
    for size in (24, 100, 300_000):  # a file cut short anywhere
        (tmp_path / "cut.gguf").write_bytes(lzma.decompress(GGUF.read_bytes())[:size])
        with pytest.raises(UserError, match="cannot read a tokenizer from .*cut.gguf"):
            write_phi3_tokenizer(tmp_path / "out", tmp_path / "cut.gguf")


# --- phi-4 and Phi-4-mini ---

def test_ranks_are_openais():
    """The ranks js-tiktoken ships are byte for byte the .tiktoken files tiktoken loads (their sha256 from
    tiktoken's tiktoken_ext/openai_public.py)."""
    expected = {"phi-4": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
                "phi-4-mini": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"}
    for family, path in RANKS.items():
        ranks, _ = read_tiktoken_ranks(path)
        lines = "".join(f"{base64.b64encode(token).decode()} {rank}\n"
                        for token, rank in sorted(ranks.items(), key=lambda item: item[1]))
        assert hashlib.sha256(lines.encode()).hexdigest() == expected[family]


def transformers_tokenizer(family: str, d: Path):
    """transformers' conversion of the same ranks (TikTokenConverter, which reads them through tiktoken; given
    here as read from the file), with the family's added tokens, as a transformers tokenizer."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks, pattern = read_tiktoken_ranks(RANKS[family])

    class Converter(TikTokenConverter):
        def load_tiktoken_bpe(self, path):
            return ranks

    backend = Converter(vocab_file=str(RANKS[family]), pattern=pattern).converted()
    added = json.loads((d / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    backend.add_special_tokens([AddedToken(t["content"], special=True, normalized=False) for t in added.values()])
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_tiktoken_families_match_transformers(tiktoken_family):
    family, d = tiktoken_family
    ours, theirs = Tokenizer(d), transformers_tokenizer(family, d)
    # transformers' conversion gives the added tokens the next free ids (phi-4's are those, Phi-4-mini's are not)
    added = [t.content for t in ours.processor.get_added_tokens_decoder().values()]
    renumber = {ours.token_to_id(t): theirs.convert_tokens_to_ids(t) for t in added}
    assert (family == "phi-4") == all(a == b for a, b in renumber.items())
    for text in TEXTS + (Path(__file__).read_text(encoding="utf-8").splitlines()):
        ids = ours.encode(text).tolist()
        assert [renumber.get(i, i) for i in ids] == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == text
        assert "".join(stream(ours, ids)) == text


def test_tiktoken_families_ids(tiktoken_family):
    family, d = tiktoken_family
    tokenizer = Tokenizer(d)
    hello = {"phi-4": [15339, 1917], "phi-4-mini": [24912, 2375]}[family]  # tiktoken's well-known ids
    assert tokenizer.encode("hello world").tolist() == hello
    if family == "phi-4":
        assert tokenizer.vocab_size == 100352  # = the model's rows: 100256 ranks, 96 added tokens
        chat = "<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|>Hi<|im_end|>"
        assert tokenizer.encode(chat).tolist() == [100264, 9125, 100266, 3513, 10015, 13, 100265, 100264, 882,
                                                   100266, 13347, 100265]
        assert (tokenizer.bos_id, tokenizer.eos_ids) == (100257, (100265,))
        assert tokenizer.token_to_id("<|dummy_85|>") == 100349 and tokenizer.token_to_id("<|endofprompt|>") == 100276
    else:
        assert tokenizer.vocab_size == 200029  # 199998 ranks, 12 added tokens, ids 199998 and 200000..200017 unused
        assert tokenizer.encode("<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>").tolist() == [
            200022, 3238, 14567, 13, 200020, 200021, 12194, 200020, 200019]
        assert (tokenizer.bos_id, tokenizer.eos_ids) == (199999, (200020, 199999))
        assert tokenizer.decode([199998, 200005, 12194]) == "Hi"  # unused ids decode to nothing
        assert "".join(stream(tokenizer, [199998, 12194, 200005])) == "Hi"
    # any ids at all, as a random model samples them: byte tokens, words, added and unused ids, padding rows
    rng = random.Random(0)
    pool = [*range(256), *rng.sample(range(256, 100000), 300), *range(tokenizer.vocab_size - 100,
                                                                      tokenizer.vocab_size + 35)]
    for _ in range(300):
        ids = rng.choices(pool, k=rng.randint(1, 12))
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids), ids


def test_tiktoken_source_errors(tmp_path):
    with pytest.raises(UserError, match="unknown tiktoken family 'phi-5'"):
        write_tiktoken_tokenizer(tmp_path, RANKS["phi-4"], "phi-5")
    with pytest.raises(UserError, match="holds 199998 ranks, not cl100k_base's"):
        write_tiktoken_tokenizer(tmp_path, RANKS["phi-4-mini"], "phi-4")
    (tmp_path / "bad.js").write_text('export default {"pat_str": "x", "bpe_ranks": "! 0 !!notbase64"};')
    with pytest.raises(UserError, match="not a js-tiktoken ranks file"):
        read_tiktoken_ranks(tmp_path / "bad.js")


# --- chat prompts: rendered and tokenized as transformers' apply_chat_template does ---

TEMPLATES = {"phi-3": ["microsoft-Phi-3-mini-4k-instruct.jinja", "microsoft-Phi-3.5-mini-instruct.jinja"],
             "phi-4": ["microsoft-phi-4.jinja", "microsoft-phi-4.llama.cpp-test.jinja"],
             "phi-4-mini": ["microsoft-Phi-4-mini-instruct.jinja"]}
SYSTEM = "You are a helpful assistant."
TURNS = [("Hello", "Hi there"), (" Who are you?\n", "  I am 🤖 "), ("Another question: 日本語?", None)]


def assert_chat_ids_match(d: Path, family: str) -> None:
    from transformers import AutoTokenizer

    from lit_gpt.prompts import ChatTemplate

    ours, theirs = Tokenizer(d), AutoTokenizer.from_pretrained(d)
    messages = [{"role": "system", "content": SYSTEM}]
    for prompt, reply in TURNS:
        messages += [{"role": "user", "content": prompt}] + ([{"role": "assistant", "content": reply}] if reply else [])
    for name in TEMPLATES[family]:
        source = (DATA / "chat_templates" / name).read_text(encoding="utf-8")
        text = ChatTemplate(name, source, tuple(ours.special_tokens.items())).conversation(TURNS, SYSTEM)
        expected = theirs.apply_chat_template(messages, chat_template=source, add_generation_prompt=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected  # transformers 5: a dict
        assert ours.encode(text).tolist() == list(expected), name


def test_phi3_chat_prompt_ids(phi3):
    assert_chat_ids_match(phi3, "phi-3")


def test_tiktoken_chat_prompt_ids(tiktoken_family):
    assert_chat_ids_match(tiktoken_family[1], tiktoken_family[0])
