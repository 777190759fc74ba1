"""Prompt styles: how a user's prompt is framed for each Phi model, when a reply must stop, and how turns join.

Two kinds, with the same interface (`apply`, `conversation`, `stop_sequences`, `name`):
- `PromptStyle`: a text frame, for phi-1, phi-1_5 and phi-2. None of them is instruction-tuned. They answer best in
  the format they saw in training (phi-2: "Instruct: ...\\nOutput:", phi-1_5: "...\\n\\nAnswer:"), rarely emit eos,
  and tend to go on with a new turn of their own ("Instruct:", "Alice:", "Answer:"). So every style carries the
  markers that start a new turn as stop sequences; the sampling loop cuts the reply before them and never prints them.
- `ChatTemplate`: a Jinja chat template, for the instruction-tuned Phi-3, Phi-3.5, Phi-4-mini and phi-4: the
  checkpoint's own (`chat_template` in tokenizer_config.json), rendered as transformers' `apply_chat_template`
  renders it, or the built-in one of a named model whose checkpoint has none. A reply stops at the turn tokens the
  template writes (<|end|>, <|user|>, <|im_end|>, ...), which are never printed.
"""

import json
import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Literal, Optional, Sequence, Union, get_args

from lit_gpt.choices import check_choice
from lit_gpt.config import Config
from lit_gpt.files import LIT_CONFIG
from lit_gpt.tokenizer import chat_template_of, special_token_strings
from lit_gpt.utils import UserError, first_line

Turns = Sequence[tuple[str, Optional[str]]]  # [(prompt, reply), ..., (prompt, None)]


@dataclass(frozen=True)
class PromptStyle:
    name: str
    template: str  # "{prompt}" is replaced by the user's text
    stop_sequences: tuple[str, ...]  # text that ends a reply (eos always does too)
    separator: str  # put between a reply and the next turn

    def apply(self, prompt: str) -> str:
        """One turn's prompt in this style (the first turn of a conversation, or a one-shot prompt)."""
        return self.template.replace("{prompt}", prompt)

    def next_turn(self, prompt: str) -> str:
        """The text that follows a previous reply: separator, then the framed prompt."""
        return self.separator + self.apply(prompt)

    def conversation(self, turns: Turns, system: Optional[str] = None) -> str:
        """All turns as one context: [(prompt, reply), ..., (prompt, None)] -> the text the model continues.

        Replies are joined as the model produced them (a leading space after "Output:" included), with
        trailing whitespace removed so that the separator alone sits between a reply and the next turn. These
        models have no system role: a system prompt is the text before the first turn, then the separator.
        """
        parts = [system + self.separator] if system else []
        for i, (prompt, reply) in enumerate(turns):
            parts.append(self.apply(prompt) if i == 0 else self.next_turn(prompt))
            if reply is not None:
                parts.append(reply.rstrip())
        return "".join(parts)


# The turn tokens of the Phi family's templates (and ChatML's, Llama 3's): <|user|>, <|end|>, <|im_end|>, <|/tool|>
_TURN_TOKEN = re.compile(r"<\|/?[A-Za-z0-9_]+\|>")


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format given as a Jinja template, rendered as transformers' `apply_chat_template` renders it: the
    messages, `add_generation_prompt`, the tokenizer's special tokens as `bos_token`, `eos_token`, ...,
    `raise_exception`, a `tojson` that keeps non-ASCII text, and `strftime_now`."""

    name: str
    source: str  # the Jinja text
    special_tokens: tuple[tuple[str, str], ...] = ()  # (("bos_token", "<s>"), ("eos_token", "<|endoftext|>"), ...)

    def __post_init__(self) -> None:
        import jinja2

        try:  # a template that does not compile is refused when it is chosen, not at the first turn
            _compile(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"the chat template ({self.name}) does not compile: {first_line(e)} (line {e.lineno})")

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        """The turn tokens the template writes, eos, and bos where it is one of those (phi-4's <|endoftext|>): a
        reply ends at any of them."""
        tokens = dict(self.special_tokens)
        found = _TURN_TOKEN.findall(self.source) + [tokens[k] for k in ("eos_token",) if k in tokens]
        found += [tokens[k] for k in ("bos_token",) if _TURN_TOKEN.fullmatch(tokens.get(k, ""))]
        return tuple(dict.fromkeys(found))

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The text of `messages` ([{"role": "user", "content": "..."}, ...]), ending with the start of the
        assistant's reply when `add_generation_prompt`."""
        import jinja2

        try:
            return _compile(self.source).render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                                add_generation_prompt=add_generation_prompt,
                                                **dict(self.special_tokens))
        except jinja2.TemplateError as e:  # raise_exception("...") in the template, or a sandbox refusal
            raise UserError(f"the chat template ({self.name}) refuses this conversation: {first_line(e)}")

    def apply(self, prompt: str) -> str:
        """One user turn, ready for the reply."""
        return self.render([{"role": "user", "content": prompt}])

    def conversation(self, turns: Turns, system: Optional[str] = None) -> str:
        """All turns as one context: [(prompt, reply), ..., (prompt, None)] -> the text the model continues."""
        messages = [{"role": "system", "content": system}] if system else []
        for prompt, reply in turns:
            messages.append({"role": "user", "content": prompt})
            if reply is not None:
                messages.append({"role": "assistant", "content": reply})
        return self.render(messages)


@lru_cache(maxsize=16)
def _compile(source: str):
    """The template compiled in a sandbox with transformers' settings (trim_blocks, lstrip_blocks, loop controls)
    and helpers."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        # {% generation %}...{% endgeneration %} marks the assistant's part for training masks; rendered as is
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


# Markers phi-2 and phi-1_5 use to open a turn in their training data and in the model cards' formats.
_TURN_MARKERS = ("Instruct:", "Output:", "Alice:", "Bob:", "Question:", "Answer:", "User:", "Assistant:")

STYLES: dict[str, PromptStyle] = {
    s.name: s
    for s in (
        # phi-2's QA format from its model card (lit-gpt wrote "Instruct:{prompt}", without the space)
        PromptStyle("phi-2", "Instruct: {prompt}\nOutput:", _TURN_MARKERS, "\n"),
        # phi-2's chat format: the user is Alice, the model is Bob
        PromptStyle("phi-2-chat", "Alice: {prompt}\nBob:", _TURN_MARKERS, "\n"),
        # phi-1_5's QA format; phi-1 is a code model, with the same format for questions
        PromptStyle("phi-1_5", "{prompt}\n\nAnswer:", _TURN_MARKERS, "\n\n"),
        PromptStyle("phi-1", "{prompt}\n\nAnswer:", _TURN_MARKERS, "\n\n"),
        # anything else (fine-tunes of unknown format, free generation): the prompt as it is, eos only
        PromptStyle("raw", "{prompt}", (), "\n"),
    )
}

# The models' own chat templates (tokenizer_config.json of microsoft/Phi-3.5-mini-instruct,
# microsoft/Phi-4-mini-instruct and microsoft/phi-4), for checkpoints of these models that lack one.
# Phi-3: <|system|>\n...<|end|>\n<|user|>\n...<|end|>\n<|assistant|>\n (Phi-3 and Phi-3.5 share it).
TEMPLATES: dict[str, str] = {
    "phi-3": "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
             "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
             "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
             "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",
    # <|system|>...<|end|><|user|>...<|end|><|assistant|>, without newlines
    "phi-4-mini": "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
                  "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' "
                  "+ message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
                  "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
                  "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}",
    # <|im_start|>system<|im_sep|>...<|im_end|><|im_start|>user<|im_sep|>...<|im_end|><|im_start|>assistant<|im_sep|>
    "phi-4": "{% for message in messages %}{% if (message['role'] == 'system') %}"
             "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
             "{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + "
             "'<|im_end|>'}}{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>' + "
             "message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}{% if add_generation_prompt %}"
             "{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}",
}

StyleName = Literal["raw", "phi-2", "phi-2-chat", "phi-1_5", "phi-1", "phi-3", "phi-4-mini", "phi-4"]
assert set(get_args(StyleName)) == set(STYLES) | set(TEMPLATES)
Style = Union[PromptStyle, ChatTemplate]


def get_style(name: StyleName, special_tokens: Optional[dict] = None) -> Style:
    """The style called `name` (see STYLES and TEMPLATES); a template sees `special_tokens` ({"eos_token": ...})."""
    check_choice("prompt_style", name, StyleName)
    if name in TEMPLATES:
        return ChatTemplate(name, TEMPLATES[name], tuple(sorted((special_tokens or {}).items())))
    return STYLES[name]


def model_name(checkpoint_dir: Union[str, Path]) -> str:
    """The model's name from lit_config.json: hf_config's name if set ("phi-2"), else "name", else ""."""
    try:
        config = Config.from_json(Path(checkpoint_dir) / LIT_CONFIG)
    except UserError:
        return ""
    return str(config.hf_config.get("name") or config.name or "")


def style_for_checkpoint(checkpoint_dir: Union[str, Path], name: Optional[StyleName] = None) -> Style:
    """The style named `name` if given; else the checkpoint's own chat template; else the built-in style of the
    checkpoint's model; else "raw".

    The model is recognised by its name in lit_config.json ("phi-2", "Phi-3.5-mini-instruct", also
    "microsoft/phi-2" or "phi-2-something"), so mirrors and fine-tunes that keep the name get the base model's
    format.
    """
    tokens = special_token_strings(checkpoint_dir) if Path(checkpoint_dir).is_dir() else {}
    if name is not None:
        return get_style(name, tokens)
    own = chat_template_of(checkpoint_dir) if Path(checkpoint_dir).is_dir() else None
    if own is not None:
        return ChatTemplate("the checkpoint's own", own, tuple(sorted(tokens.items())))
    found = model_name(checkpoint_dir).split("/")[-1].lower()
    # longest first: "phi-1_5" must not be taken for "phi-1", nor "phi-4-mini" for "phi-4"
    for style in ("phi-4-mini", "phi-1_5", "phi-2", "phi-1", "phi-3", "phi-4"):
        if found == style or (found.startswith(style) and found[len(style)] in "-_."):
            return get_style(style, tokens)  # type: ignore[arg-type]
    return STYLES["raw"]


def render_messages(style: Style, messages: Sequence[dict]) -> str:
    """OpenAI-style messages ([{"role": "system" | "user" | "assistant", "content": ...}]) as the text the model
    continues with the assistant's reply: through the chat template, or as the style's turns (system messages
    before the first turn; consecutive user messages are turns without a reply)."""
    if isinstance(style, ChatTemplate):
        return style.render(messages)
    system = "\n".join(m["content"] for m in messages if m["role"] in ("system", "developer")) or None
    turns: list[tuple[str, Optional[str]]] = []
    prompt: Optional[str] = None
    for m in messages:
        if m["role"] == "user":
            if prompt is not None:
                turns.append((prompt, ""))
            prompt = m["content"]
        elif m["role"] == "assistant":
            turns.append((prompt or "", m["content"]))
            prompt = None
    if prompt is None:
        raise UserError("the last message must be the user's: the model writes the assistant's reply")
    return style.conversation(turns + [(prompt, None)], system)
