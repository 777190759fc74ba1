"""Chat with a Phi model in the terminal: multi-turn, kept in the KV cache, replies streamed."""

import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_gpt.checkpoint import convert_if_needed, load_model
from lit_gpt.generate import ChatSession, check_sampling, choose_device, compile_decode, make_generator, unescape
from lit_gpt.prompts import style_for_checkpoint
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.cli import run_cli
from lit_gpt.utils import UserError

RESET = "/reset"


def main(
    checkpoint_dir: Path = Path("checkpoints/microsoft/phi-2"),
    max_new_tokens: int = 512,
    top_k: Optional[int] = 200,
    top_p: float = 1.0,
    temperature: float = 0.8,
    precision: Optional[str] = None,
    compile: bool = False,
    quantize: Optional[str] = None,
    group_size: int = 32,
    seed: Optional[int] = None,
    prompt_style: Optional[str] = None,
    escapes: bool = True,
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
        top_k: Sample only from the k most likely tokens (null: all).
        top_p: Sample only from the most likely tokens that make up this much probability (1: off).
        temperature: Divides the logits before sampling; 0 is greedy decoding.
        precision: 32-true, bf16-true or 16-true (default: bf16 where the GPU or CPU supports it, else 16
            on a GPU and 32 on a CPU).
        compile: Compile the decode step with torch.compile (slow first reply, faster after).
        quantize: Weight-only quantization at load: int8 (per output channel) or int4 (group-wise), on CPU
            and GPU; or the bitsandbytes modes bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8 (CUDA only).
        group_size: Inputs per scale for --quantize int4: 32, 64, 128 or 256 (smaller: more accurate, larger file).
        seed: Seed of the sampling generator; a fixed seed reproduces a conversation (null: random).
        prompt_style: phi-2 ("Instruct: ...\\nOutput:"), phi-2-chat ("Alice: ...\\nBob:"), phi-1_5, phi-1
            ("...\\n\\nAnswer:") or raw (default: from the checkpoint's model name, raw if unknown).
        escapes: Interpret \\n, \\t and \\\\ typed in a prompt as a newline, a tab and a backslash.
    """
    if max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p)
    style = style_for_checkpoint(checkpoint_dir, prompt_style)
    device, precision, dtype = choose_device(precision)
    convert_if_needed(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    t0 = time.perf_counter()
    model = load_model(checkpoint_dir, device=device, dtype=dtype, quantize=quantize, group_size=group_size)
    model.set_kv_cache(1)
    err = sys.stderr
    print(f"Loaded {checkpoint_dir} on {device.type} in {precision} in {time.perf_counter() - t0:.2f} s; "
          f"prompt style {style.name}", file=err)
    session = ChatSession(
        model, tokenizer, style, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        generator=make_generator(device, seed), decode_forward=compile_decode(model) if compile else None,
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
        replies = session.reply(unescape(prompt) if escapes else prompt)
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
            continue
        except UserError as e:
            print(flush=True)
            print(f"[{e}]", file=err, flush=True)
            continue
        print(flush=True)
        s = session.stats
        rate = s["tokens"] / s["seconds"] if s["seconds"] else float("nan")
        print(f"Time for inference: {s['seconds']:.2f} s, {rate:.2f} tokens/s, {s['tokens']} tokens "
              f"({s['prefill_tokens']} prefilled, first token after {s['first_token_seconds']:.3f} s)",
              file=err, flush=True)


if __name__ == "__main__":
    run_cli(main)
