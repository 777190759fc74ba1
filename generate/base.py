"""Free generation: continue a prompt with a Phi model, streamed, with speed and memory stats."""

import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from lit_gpt.checkpoint import convert_if_needed, load_model
from lit_gpt.config import Config
from lit_gpt.generate import (
    check_context, check_sampling, choose_device, compile_decode, decode_step_bytes, generate, make_generator, peak_memory,
    stream, sync, unescape,
)
from lit_gpt.prompts import get_style
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.cli import run_cli
from lit_gpt.utils import UserError


def main(
    prompt: str = "What food do people eat in Germany?",
    checkpoint_dir: Path = Path("checkpoints/microsoft/phi-2"),
    num_samples: int = 1,
    max_new_tokens: int = 50,
    top_k: Optional[int] = 200,
    top_p: float = 1.0,
    temperature: float = 0.8,
    precision: Optional[str] = None,
    compile: bool = False,
    quantize: Optional[str] = None,
    group_size: int = 32,
    seed: Optional[int] = 1234,
    prompt_style: str = "raw",
    escapes: bool = True,
) -> None:
    """Continue a prompt with a Phi model: prompt and continuation to stdout, speed and memory to stderr.

    With one sample the continuation is streamed as it is generated; several samples are printed at the end.
    Stats: time to first token, tokens/s, memory bandwidth achieved (bytes of weights read per decode step x
    steps/s) and peak memory.

    Args:
        prompt: The text to continue. Escapes \\n, \\t and \\\\ are turned into a newline, a tab and a
            backslash (a shell passes "...\\nBob:" through as backslash + n); see --escapes.
        checkpoint_dir: A converted checkpoint (lit_config.json, lit_model.pth and tokenizer files), or
            one with Hugging Face weights only, which is converted first.
        num_samples: Continuations to generate, together as one batch.
        max_new_tokens: Most tokens to generate per sample; prompt + new tokens must fit the model's context.
        top_k: Sample only from the k most likely tokens (null: all).
        top_p: Sample only from the most likely tokens that make up this much probability (1: off).
        temperature: Divides the logits before sampling; 0 is greedy decoding.
        precision: 32-true, bf16-true or 16-true (default: bf16 where the GPU or CPU supports it, else 16
            on a GPU and 32 on a CPU).
        compile: Compile the decode step with torch.compile (slow first steps, faster after).
        quantize: Weight-only quantization at load: int8 (per output channel) or int4 (group-wise), on CPU
            and GPU; or the bitsandbytes modes bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8 (CUDA only).
        group_size: Inputs per scale for --quantize int4: 32, 64, 128 or 256 (smaller: more accurate, larger file).
        seed: Seed of the sampling generator; a fixed seed reproduces a run (null: a fresh random seed).
        prompt_style: How to frame the prompt: raw (as it is, stop only at eos), phi-2 ("Instruct: ...\\nOutput:"),
            phi-2-chat ("Alice: ...\\nBob:"), phi-1_5 or phi-1 ("...\\n\\nAnswer:"). A style also stops at the
            start of a new turn ("Instruct:", "Alice:", ...), which is never printed.
        escapes: Interpret \\n, \\t and \\\\ in --prompt (false: take the prompt literally).
    """
    if num_samples < 1:
        raise UserError(f"--num_samples must be >= 1, got {num_samples}")
    if max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p)
    style = get_style(prompt_style)
    text = style.apply(unescape(prompt) if escapes else prompt)
    device, precision, dtype = choose_device(precision)
    convert_if_needed(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    ids = tokenizer.encode(text, device=device)
    max_returned_tokens = len(ids) + max_new_tokens
    # check the length before loading the weights, which can take a while
    block = Config.from_json(Path(checkpoint_dir) / "lit_config.json").block_size
    check_context(block, len(ids), max_returned_tokens)
    t0 = time.perf_counter()
    model = load_model(checkpoint_dir, device=device, dtype=dtype, quantize=quantize, group_size=group_size)
    print(f"Loaded {checkpoint_dir} on {device.type} in {precision} in {time.perf_counter() - t0:.2f} s",
          file=sys.stderr)
    model.set_kv_cache(num_samples, max_seq_length=max_returned_tokens)
    kwargs = dict(num_samples=num_samples, stop_sequences=style.stop_sequences, top_k=top_k, top_p=top_p)
    decode_forward = None
    if compile:
        decode_forward = compile_decode(model)
        t0 = time.perf_counter()
        generate(model, tokenizer, ids, min(len(ids) + 3, block), temperature=0.0, decode_forward=decode_forward,
                 **kwargs)  # warm-up: compile outside the timed run (greedy, so the seeded generator is untouched)
        print(f"Compiled in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    generator = make_generator(device, seed)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    one = num_samples == 1
    if one:
        print(text, end="", flush=True)
    t_start = time.perf_counter()
    t_first = None
    completions = []
    for completions in stream(model, tokenizer, ids, max_returned_tokens, temperature=temperature,
                              generator=generator, decode_forward=decode_forward, **kwargs):
        if t_first is None:
            t_first = time.perf_counter()
        if one and completions[0].delta:
            print(completions[0].delta, end="", flush=True)
    sync(device)
    t_end = time.perf_counter()
    if one:
        print(flush=True)
    else:
        for i, c in enumerate(completions):
            print(f"--- sample {i + 1} ({c.finish_reason}) ---\n{text}{c.text}", flush=True)

    # sampling steps (the loop may yield once more at the end, only to release held-back text)
    steps = max(len(c.ids) for c in completions)
    tokens = sum(len(c.ids) for c in completions)
    total = t_end - t_start
    decode_rate = (steps - 1) / (t_end - t_first) if steps > 1 and t_end > t_first else float("nan")
    gb = decode_step_bytes(model, num_samples) / 1e9
    err = sys.stderr
    print(f"Time to first token: {t_first - t_start:.3f} s ({len(ids)} prompt tokens"
          f"{f' x {num_samples} samples' if not one else ''})", file=err)
    print(f"Generated {tokens} tokens in {total:.2f} s: {tokens / total:.2f} tokens/s"
          f" ({num_samples} sample{'s' if not one else ''}, stopped: "
          f"{', '.join(sorted({c.finish_reason for c in completions}))})", file=err)
    print(f"Decode: {decode_rate:.2f} steps/s x {gb:.3f} GB of weights per step = "
          f"bandwidth achieved {decode_rate * gb:.2f} GB/s", file=err)
    print(f"Peak memory: {peak_memory(device)}", file=err)


if __name__ == "__main__":
    run_cli(main)
