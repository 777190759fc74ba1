"""Benchmark generation: ours in each precision/quantization against transformers and llama.cpp, on the same weights."""

import sys
from pathlib import Path
from typing import Literal, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_gpt.benchmark import benchmark, print_table
from lit_gpt.choices import WeightMode
from lit_gpt.cli import run_cli
from lit_gpt.config import configs
from lit_gpt.files import LIT_MODEL
from lit_gpt.quantize import check_int4_group_size
from lit_gpt.utils import InvalidArgument


def main(
    checkpoint_dir: Path = Path("checkpoints/microsoft/phi-2"),
    modes: list[WeightMode] = ["bf16", "int8", "int4"],
    max_new_tokens: int = 64,
    compile: bool = False,
    group_size: int = 32,
    transformers: bool = True,
    make_random: Optional[Literal[tuple(c["name"] for c in configs)]] = None,
    rounds: int = 1,
    llama_cpp: bool = False,
    prompt_tokens: Optional[int] = None,
) -> None:
    """Benchmark generation, ours in each mode against transformers (and llama.cpp) on the same weights, and print a
    table.

    The table holds load time, time to first token, prefill and decode tokens/s, memory bandwidth
    achieved (and its share of this machine's read bandwidth, measured in the same run) and peak
    resident memory, for each mode, and for transformers on the same checkpoint when its Hugging Face
    files are present. Batch 1, greedy, a short code prompt; each run in its own process.

    Args:
        checkpoint_dir: A checkpoint directory with lit_model.pth (and the Hugging Face files for transformers).
        modes: Which of bf16, fp32, int8, int4 to run, e.g. --modes '[bf16, int4]'.
        max_new_tokens: Tokens to decode per run.
        compile: Run our decode steps through torch.compile.
        group_size: Group size for int4.
        transformers: Also run transformers' generate on the Hugging Face files in checkpoint_dir.
        make_random: A named config (phi-2, Phi-3-mini-4k-instruct, phi-4, ...): first write a random-weight
            checkpoint of that shape into checkpoint_dir (the Hub's file layout, then converted; with --transformers
            False only ours, half the disk), unless one is there, to benchmark without the Hub.
        rounds: Run every configuration this many times, in rotated order, and report the median of each
            figure: on shared machines the bandwidth drifts by tens of percent within minutes.
        llama_cpp: Also run llama.cpp (llama-cpp-python, the `bench` extra) on GGUF exports of the same weights in
            bf16, q8_0 and q4_0, exported into checkpoint_dir/gguf/ on the first run (scripts/export_gguf.py).
        prompt_tokens: A prompt of this many tokens of code instead of the 27-token one, e.g. 480 to measure
            prefill on a long prompt.
    """
    if max_new_tokens < 2:
        raise InvalidArgument("max_new_tokens", f"must be >= 2 (a decode speed needs two tokens), got {max_new_tokens}")
    if "int4" in modes:
        check_int4_group_size(group_size)
    if make_random and not (checkpoint_dir / LIT_MODEL).is_file():
        from lit_gpt.convert import convert_hf_checkpoint
        from lit_gpt.random_checkpoint import write_random_hf_checkpoint, write_random_lit_checkpoint

        print(f"writing a random {make_random} checkpoint to {checkpoint_dir}", file=sys.stderr)
        if transformers:
            write_random_hf_checkpoint(checkpoint_dir, make_random)
            convert_hf_checkpoint(checkpoint_dir)
        else:
            write_random_lit_checkpoint(checkpoint_dir, make_random)
    rows = benchmark(checkpoint_dir, modes, max_new_tokens, compile, group_size, transformers, rounds,
                     llama_cpp=llama_cpp, prompt_tokens=prompt_tokens)
    print_table(rows, checkpoint_dir, max_new_tokens, rounds)


if __name__ == "__main__":
    run_cli(main)
