"""Chat with a Phi model in the terminal: multi-turn, kept in the KV cache, replies streamed."""

import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_gpt.cli import LoadOptions, SamplingOptions, clean_text, load_for_inference, open_checkpoint, run_cli, unescape
from lit_gpt.generate import ChatSession, compile_decode, make_generator
from lit_gpt.prompts import ChatTemplate, StyleName, style_for_checkpoint
from lit_gpt.utils import InvalidArgument, UserError

RESET = "/reset"


def main(
    checkpoint_dir: Path = Path("checkpoints/microsoft/phi-2"),
    max_new_tokens: int = 512,
    seed: Optional[int] = None,
    prompt_style: Optional[StyleName] = None,
    system: Optional[str] = None,
    escapes: bool = True,
    sampling: SamplingOptions = SamplingOptions(),
    options: LoadOptions = LoadOptions(),
) -> None:
    """Chat with a Phi model: type after ">> Prompt: ", the reply streams after ">> Reply: ".

    The conversation stays in the model's KV cache, so each turn only processes its own tokens. When the
    context is full the oldest turns are dropped (a notice goes to stderr). An empty prompt or end of input
    (Ctrl-D) exits; Ctrl-C during a reply stops it and returns to the prompt (what was shown of the reply
    stays in the conversation); /reset starts a new conversation.

    Args:
        checkpoint_dir: A converted checkpoint (lit_config.json, lit_model.pth and tokenizer files), or
            one with Hugging Face weights only, which is converted first.
        max_new_tokens: Most tokens per reply (also bounded by the room left in the context).
        seed: Seed of the sampling generator; a fixed seed reproduces a conversation (null: random).
        prompt_style: phi-2 ("Instruct: ...\\nOutput:"), phi-2-chat ("Alice: ...\\nBob:"), phi-1_5, phi-1
            ("...\\n\\nAnswer:"), the chat templates of phi-3 (Phi-3 and Phi-3.5), phi-4-mini and phi-4, or raw
            (default: the checkpoint's own chat template, else the style of its model's name, raw if unknown).
        system: A system prompt for the whole conversation (the template's system message; for phi-2 and the
            other styles, text before the first turn). Escapes are interpreted as in prompts.
        escapes: Interpret \\n, \\t and \\\\ typed in a prompt as a newline, a tab and a backslash.
    """
    if max_new_tokens < 1:
        raise InvalidArgument("max_new_tokens", f"must be >= 1, got {max_new_tokens}")
    if sys.stdin is None or sys.stdin.closed:
        raise UserError("chat reads the prompts from stdin, which is closed; run it in a terminal or pipe prompts in")
    sys.stdin.reconfigure(errors="replace")  # a prompt that is not valid UTF-8 keeps the conversation going
    device, precision, dtype, tokenizer, _ = open_checkpoint(checkpoint_dir, options)
    style = style_for_checkpoint(checkpoint_dir, prompt_style)
    if system is not None:
        system = clean_text(unescape(system) if escapes else system)
    model = load_for_inference(checkpoint_dir, options, device, precision, dtype)
    model.set_kv_cache(1)
    err = sys.stderr
    print(f"Chat template: {style.name}" if isinstance(style, ChatTemplate) else f"Prompt style {style.name}", file=err)
    session = ChatSession(
        model, tokenizer, style, system=system, max_new_tokens=max_new_tokens, generator=make_generator(device, seed),
        decode_forward=compile_decode(model) if options.compile else None, **sampling.as_kwargs(),
    )
    print(f"Empty prompt or Ctrl-D: exit. Ctrl-C: stop a reply. {RESET}: new conversation.", file=err, flush=True)
    while True:
        try:
            prompt = input(">> Prompt: ")
        except EOFError:
            print()
            return
        if not prompt.strip():
            return
        if prompt.strip() == RESET:
            session.reset()
            print("[new conversation]", file=err, flush=True)
            continue
        print(">> Reply: ", end="", flush=True)
        reply(session, clean_text(unescape(prompt) if escapes else prompt))


def reply(session: ChatSession, prompt: str) -> None:
    """Stream one reply; Ctrl-C stops it (what was shown stays in the conversation), a prompt too long for the
    context is a notice and the conversation goes on."""
    err = sys.stderr
    replies = session.reply(prompt)
    started = False
    try:
        for chunk in replies:
            if not started:  # the model's reply starts with the space after "Output:"; don't show it
                chunk = chunk.lstrip()
                started = bool(chunk)
            print(chunk, end="", flush=True)
    except KeyboardInterrupt:
        replies.close()  # commits the part shown (a no-op if the interrupt came from inside the generator)
        print(flush=True)
        print("[reply interrupted]", file=err, flush=True)
        return
    except UserError as e:
        print(flush=True)
        print(f"[{e}]", file=err, flush=True)
        return
    print(flush=True)
    s = session.stats
    rate = s["tokens"] / s["seconds"] if s["seconds"] else float("nan")
    print(f"Time for inference: {s['seconds']:.2f} s, {rate:.2f} tokens/s, {s['tokens']} tokens "
          f"({s['prefill_tokens']} prefilled, first token after {s['first_token_seconds']:.3f} s)",
          file=err, flush=True)


if __name__ == "__main__":
    run_cli(main)
