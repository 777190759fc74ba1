"""Prompt styles: how a user's prompt is framed for each Phi model, when a reply must stop, and how turns join.

None of the Phi models is instruction-tuned. They answer best in the format they saw in training
(phi-2: "Instruct: ...\\nOutput:", phi-1_5: "...\\n\\nAnswer:"), rarely emit eos, and tend to go on with a
new turn of their own ("Instruct:", "Alice:", "Answer:"). So every style carries the markers that start a
new turn as stop sequences; the sampling loop cuts the reply before them and never prints them.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence, Union, get_args

from lit_gpt.choices import check_choice
from lit_gpt.config import Config
from lit_gpt.files import LIT_CONFIG
from lit_gpt.utils import UserError


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

    def conversation(self, turns: Sequence[tuple[str, Optional[str]]]) -> str:
        """All turns as one context: [(prompt, reply), ..., (prompt, None)] -> the text the model continues.

        Replies are joined as the model produced them (a leading space after "Output:" included), with
        trailing whitespace removed so that the separator alone sits between a reply and the next turn.
        """
        parts = []
        for i, (prompt, reply) in enumerate(turns):
            parts.append(self.apply(prompt) if i == 0 else self.next_turn(prompt))
            if reply is not None:
                parts.append(reply.rstrip())
        return "".join(parts)


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


StyleName = Literal["raw", "phi-2", "phi-2-chat", "phi-1_5", "phi-1"]
assert set(get_args(StyleName)) == set(STYLES)


def get_style(name: StyleName) -> PromptStyle:
    """The style called `name` (see STYLES)."""
    check_choice("prompt_style", name, StyleName)
    return STYLES[name]


def model_name(checkpoint_dir: Union[str, Path]) -> str:
    """The model's name from lit_config.json: hf_config's name if set ("phi-2"), else "name", else ""."""
    try:
        config = Config.from_json(Path(checkpoint_dir) / LIT_CONFIG)
    except UserError:
        return ""
    return str(config.hf_config.get("name") or config.name or "")


def style_for_checkpoint(checkpoint_dir: Union[str, Path], name: Optional[StyleName] = None) -> PromptStyle:
    """The style named `name` if given, else the one matching the checkpoint's model, else "raw".

    The model is recognised by its name in lit_config.json ("phi-2", also "microsoft/phi-2" or
    "phi-2-something"), so mirrors and fine-tunes that keep the name get the base model's format.
    """
    if name is not None:
        return get_style(name)
    found = model_name(checkpoint_dir).split("/")[-1].lower()
    # longest first: "phi-1_5" must not be taken for "phi-1"
    for style in sorted(("phi-2", "phi-1_5", "phi-1"), key=len, reverse=True):
        if found == style or found.startswith(style + "-") or found.startswith(style + "_"):
            return STYLES[style]
    return STYLES["raw"]
