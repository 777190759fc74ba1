"""Chat templates: the Phi family's real templates (tests/data/chat_templates, see tests/data/README.md) render a
conversation (system + 3 turns) exactly as transformers' apply_chat_template does; the built-in templates are the
models' own; a checkpoint's template is found and preferred; a template's refusal is one line."""

import json
import lzma
from pathlib import Path
from typing import Optional

import pytest

from lit_gpt.prompts import TEMPLATES, ChatTemplate, get_style, style_for_checkpoint
from lit_gpt.tokenizer import write_phi_tokenizer
from lit_gpt.utils import UserError

DATA = Path(__file__).resolve().parent / "data"

# The special tokens each family's tokenizer_config.json hands its template
FAMILY_TOKENS = {
    "phi-3": {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>"},
    "phi-4-mini": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>"},
    "phi-4": {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|dummy_85|>"},
}
FILES = {
    "microsoft-Phi-3-mini-4k-instruct.jinja": "phi-3",
    "microsoft-Phi-3.5-mini-instruct.jinja": "phi-3",
    "ggml-vocab-phi-3.gguf": "phi-3",  # Phi-3-mini's first template, kept in llama.cpp's vocabulary file
    "microsoft-Phi-4-mini-instruct.jinja": "phi-4-mini",
    "microsoft-phi-4.jinja": "phi-4",
    "microsoft-phi-4.llama.cpp-test.jinja": "phi-4",
}
SYSTEM = "You are a helpful assistant."
# llama.cpp's test conversation (spaces kept around a reply), and text a template must pass through as it is
TURNS = [("Hello", "Hi there"), ("Who are you", "   I am an assistant   "),
         ("{{ 'not a template' }} <b>naïve</b> 日本語 😀\nline two", None)]


def template_text(name: str, tmp: Optional[Path] = None) -> str:
    if name.endswith(".gguf"):  # the template inside llama.cpp's vocabulary file (GGUFReader maps a plain file)
        from gguf import GGUFReader

        path = tmp / name
        path.write_bytes(lzma.decompress((DATA / "llama.cpp" / f"{name}.xz").read_bytes()))
        return GGUFReader(path).fields["tokenizer.chat_template"].contents()
    return (DATA / "chat_templates" / name).read_text(encoding="utf-8")


def messages(turns, system=None) -> list[dict]:
    out = [{"role": "system", "content": system}] if system else []
    for prompt, reply in turns:
        out.append({"role": "user", "content": prompt})
        if reply is not None:
            out.append({"role": "assistant", "content": reply})
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """A transformers tokenizer to render with (the template and the special tokens are passed in)."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("tokenizer")
    write_phi_tokenizer(d)
    return transformers.AutoTokenizer.from_pretrained(d)


def transformers_render(hf_tokenizer, source: str, family: str, turns, system=None) -> str:
    return hf_tokenizer.apply_chat_template(messages(turns, system), chat_template=source, tokenize=False,
                                            add_generation_prompt=True, **FAMILY_TOKENS[family])


@pytest.mark.parametrize("name", [pytest.param(f, marks=pytest.mark.slow) if f.endswith(".gguf") else f
                                  for f in FILES])  # reading the GGUF file takes a second
def test_rendering_equals_transformers(hf_tokenizer, name, tmp_path):
    family, source = FILES[name], template_text(name, tmp_path)
    ours = ChatTemplate(name, source, tuple(FAMILY_TOKENS[family].items()))
    for turns in (TURNS[:1], TURNS):
        for system in (None, SYSTEM):
            assert ours.conversation(turns, system) == transformers_render(hf_tokenizer, source, family, turns, system)
    assert ours.apply("Hi") == transformers_render(hf_tokenizer, source, family, [("Hi", None)])


def test_phi4_conversation_as_llama_cpp_expects():
    """llama.cpp's own expectation for phi-4's first template (tests/test-chat-template.cpp), independently."""
    source = template_text("microsoft-phi-4.llama.cpp-test.jinja")
    turns = [("Hello", "Hi there"), ("Who are you", "   I am an assistant   "), ("Another question", None)]
    assert ChatTemplate("phi-4", source).conversation(turns, "You are a helpful assistant") == (
        "<|im_start|>system<|im_sep|>You are a helpful assistant<|im_end|><|im_start|>user<|im_sep|>Hello<|im_end|>"
        "<|im_start|>assistant<|im_sep|>Hi there<|im_end|><|im_start|>user<|im_sep|>Who are you<|im_end|>"
        "<|im_start|>assistant<|im_sep|>   I am an assistant   <|im_end|><|im_start|>user<|im_sep|>Another "
        "question<|im_end|><|im_start|>assistant<|im_sep|>")


def test_built_in_templates_are_the_models_own():
    assert TEMPLATES["phi-3"] == template_text("microsoft-Phi-3.5-mini-instruct.jinja")
    assert TEMPLATES["phi-4-mini"] == template_text("microsoft-Phi-4-mini-instruct.jinja")
    assert TEMPLATES["phi-4"] == template_text("microsoft-phi-4.jinja")
    # the formats the issue names
    assert get_style("phi-3").conversation([("Hi", None)], "Be brief.") == \
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert get_style("phi-4").apply("Hi") == "<|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant<|im_sep|>"
    assert get_style("phi-4-mini").conversation([("Hi", "Hello!"), ("More?", None)]) == \
        "<|user|>Hi<|end|><|assistant|>Hello!<|end|><|user|>More?<|end|><|assistant|>"


def test_stop_sequences_are_the_turn_tokens():
    assert get_style("phi-3", FAMILY_TOKENS["phi-3"]).stop_sequences == (
        "<|system|>", "<|end|>", "<|user|>", "<|assistant|>", "<|endoftext|>")
    assert get_style("phi-4", FAMILY_TOKENS["phi-4"]).stop_sequences == (
        "<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|endoftext|>")
    assert set(get_style("phi-4-mini").stop_sequences) == {"<|tool|>", "<|/tool|>", "<|end|>", "<|assistant|>"}


def test_template_helpers_as_in_transformers(hf_tokenizer):
    """raise_exception, tojson (non-ASCII kept), {% generation %}, loop controls, trim_blocks/lstrip_blocks."""
    source = ("{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}\n"
              "  {% generation %}{{ m | tojson }}{% endgeneration %}\n"
              "{% endfor %}{% if add_generation_prompt %}[{{ strftime_now('%Y') }}]{% endif %}")
    ours = ChatTemplate("helpers", source, tuple(FAMILY_TOKENS["phi-3"].items()))
    assert ours.conversation(TURNS, SYSTEM) == transformers_render(hf_tokenizer, source, "phi-3", TURNS, SYSTEM)
    assert '"naïve' in ours.apply("naïve")
    refusing = ChatTemplate("strict", "{% if messages[0]['role'] == 'system' %}"
                                      "{{ raise_exception('System role not supported') }}{% endif %}ok")
    assert refusing.apply("Hi") == "ok"
    with pytest.raises(UserError, match=r"^the chat template \(strict\) refuses this conversation: System role not "
                                        r"supported$"):
        refusing.conversation([("Hi", None)], SYSTEM)
    with pytest.raises(UserError, match=r"^the chat template \(broken\) does not compile: .*'endfor'.* \(line 1\)$"):
        ChatTemplate("broken", "{% for m in messages %}")
    with pytest.raises(UserError, match="refuses this conversation: .*unsafe"):  # the sandbox holds
        ChatTemplate("escape", "{{ messages.__class__.__mro__ }}").apply("Hi")


def test_the_checkpoint_template_is_preferred(tmp_path):
    (tmp_path / "lit_config.json").write_text('{"name": "x", "hf_config": {"name": "Phi-3.5-mini-instruct"}}')
    assert style_for_checkpoint(tmp_path).name == "phi-3"  # no template: the model's built-in one
    own = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}{{ eos_token }}"
    config = {"chat_template": own, "eos_token": "<|endoftext|>", "bos_token": {"content": "<s>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    style = style_for_checkpoint(tmp_path)
    assert isinstance(style, ChatTemplate) and style.source == own
    assert style.apply("Hi") == "<Hi><|endoftext|>"
    assert dict(style.special_tokens) == {"eos_token": "<|endoftext|>", "bos_token": "<s>"}
    # an explicit style wins, and a built-in template sees the checkpoint's special tokens
    assert style_for_checkpoint(tmp_path, "phi-2").name == "phi-2"
    assert dict(style_for_checkpoint(tmp_path, "phi-3").special_tokens)["eos_token"] == "<|endoftext|>"
