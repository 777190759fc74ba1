"""Free generation: continue a prompt with a Phi model, streamed, with speed and memory stats."""

import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from lit_gpt.cli import LoadOptions, SamplingOptions, clean_text, load_for_inference, open_checkpoint, run_cli, unescape
from lit_gpt.device import decode_step_bytes, free_memory, kv_cache_bytes, peak_memory, sync
from lit_gpt.generate import check_context, compile_decode, generate, make_generator, stream
from lit_gpt.prompts import StyleName, get_style
from lit_gpt.utils import InvalidArgument


def main(
    prompt: str = "What food do people eat in Germany?",
    checkpoint_dir: Path = Path("checkpoints/microsoft/phi-2"),
    num_samples: int = 1,
    max_new_tokens: int = 50,
    seed: Optional[int] = 1234,
    prompt_style: StyleName = "raw",
    escapes: bool = True,
    sampling: SamplingOptions = SamplingOptions(),
    options: LoadOptions = LoadOptions(),
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
        seed: Seed of the sampling generator; a fixed seed reproduces a run (null: a fresh random seed).
        prompt_style: How to frame the prompt: raw (as it is, stop only at eos), phi-2 ("Instruct: ...\\nOutput:"),
            phi-2-chat ("Alice: ...\\nBob:"), phi-1_5 or phi-1 ("...\\n\\nAnswer:"), or the chat templates of
            phi-3 (Phi-3 and Phi-3.5: "<|user|>\\n...<|end|>\\n<|assistant|>\\n"), phi-4-mini
            ("<|user|>...<|end|><|assistant|>") and phi-4 ("<|im_start|>user<|im_sep|>...<|im_end|>
            <|im_start|>assistant<|im_sep|>"). A style also stops at the
            start of a new turn ("Instruct:", "Alice:", ...) or at its end-of-turn token, never printed.
        escapes: Interpret \\n, \\t and \\\\ in --prompt (false: take the prompt literally).
    """
    if num_samples < 1:
        raise InvalidArgument("num_samples", f"must be >= 1, got {num_samples}")
    if max_new_tokens < 1:
        raise InvalidArgument("max_new_tokens", f"must be >= 1, got {max_new_tokens}")
    style = get_style(prompt_style)
    text = style.apply(clean_text(unescape(prompt) if escapes else prompt))
    device, precision, dtype, tokenizer, config = open_checkpoint(checkpoint_dir, options)
    ids = tokenizer.encode(text, device=device)
    max_returned_tokens = len(ids) + max_new_tokens
    check_context(config.block_size, len(ids), max_returned_tokens)  # before loading the weights
    need, free = kv_cache_bytes(config, num_samples, max_returned_tokens, dtype), free_memory(device)
    if need > free:
        raise InvalidArgument("num_samples", f"is too large: {num_samples} samples of {max_returned_tokens} tokens "
                              f"need {need / 1e9:.1f} GB of KV cache but {free / 1e9:.1f} GB are free; use fewer")
    model = load_for_inference(checkpoint_dir, options, device, precision, dtype)
    model.set_kv_cache(num_samples, max_seq_length=max_returned_tokens)
    kwargs = dict(num_samples=num_samples, stop_sequences=style.stop_sequences, top_k=sampling.top_k,
                  top_p=sampling.top_p)
    decode_forward = None
    if options.compile:
        decode_forward = compile_decode(model)
        t0 = time.perf_counter()
        generate(model, tokenizer, ids, min(len(ids) + 3, config.block_size), temperature=0.0,
                 decode_forward=decode_forward, **kwargs)  # warm-up: compile outside the timed run (greedy: the
        # seeded generator is untouched)
        print(f"Compiled in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    generator = make_generator(device, seed)
    temperature = sampling.temperature

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

    print_stats(model, completions, len(ids), t_start, t_first, t_end)


def print_stats(model, completions: list, prompt_len: int, t_start: float, t_first: float, t_end: float) -> None:
    """Time to first token, tokens/s, bandwidth achieved and peak memory, to stderr."""
    # sampling steps (the loop may yield once more at the end, only to release held-back text)
    n = len(completions)
    steps = max(len(c.ids) for c in completions)
    tokens = sum(len(c.ids) for c in completions)
    total = t_end - t_start
    decode_rate = (steps - 1) / (t_end - t_first) if steps > 1 and t_end > t_first else float("nan")
    gb = decode_step_bytes(model, n) / 1e9
    err = sys.stderr
    print(f"Time to first token: {t_first - t_start:.3f} s ({prompt_len} prompt tokens"
          f"{f' x {n} samples' if n > 1 else ''})", file=err)
    print(f"Generated {tokens} tokens in {total:.2f} s: {tokens / total:.2f} tokens/s"
          f" ({n} sample{'s' if n > 1 else ''}, stopped: "
          f"{', '.join(sorted({c.finish_reason for c in completions}))})", file=err)
    print(f"Decode: {decode_rate:.2f} steps/s x {gb:.3f} GB of weights per step = "
          f"bandwidth achieved {decode_rate * gb:.2f} GB/s", file=err)
    print(f"Peak memory: {peak_memory(model.lm_head.weight.device)}", file=err)


if __name__ == "__main__":
    run_cli(main)
