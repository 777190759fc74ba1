"""Quality on held-out text: loss, perplexity and top-1 accuracy of a checkpoint in bf16, fp32, int8 and int4."""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_gpt.convert import convert_if_needed
from lit_gpt.choices import WeightMode
from lit_gpt.quantize import check_int4_group_size
from lit_gpt.evaluate import evaluate, file_tokens, held_out_tokens, print_table
from lit_gpt.cli import run_cli
from lit_gpt.utils import InvalidArgument


def main(
    checkpoint_dir: Path = Path("demo/phi-stdlib"),
    modes: list[WeightMode] = ["bf16", "int8", "int4"],
    group_sizes: list[int] = [32, 128],
    data_dir: Optional[Path] = None,
    files: Optional[list[Path]] = None,
    max_tokens: Optional[int] = None,
    batch_size: int = 8,
    decode: bool = False,
) -> None:
    """Score held-out text with the checkpoint in each mode and print a table (loss, perplexity, change of
    perplexity against bf16, top-1 next-token accuracy, top-1 agreement with bf16).

    By default the text is the validation files of the run that trained the checkpoint (listed in its
    training.json, e.g. the demo model's held-out files of the Python standard library).

    Args:
        checkpoint_dir: The checkpoint (converted first if it holds only Hugging Face weights).
        modes: Any of bf16, fp32, int8, int4.
        group_sizes: int4 group sizes to score (one row each).
        data_dir: Where the held-out files are, if not in the folder training.json records.
        files: Score these text files instead of the held-out files.
        max_tokens: Score only the first N tokens of the text.
        batch_size: Windows per forward pass.
        decode: Feed each window one token at a time through the KV cache, as generation does (on CPU through the
            decode kernels, whose int8/int4 products round the activations to 8 bits per block of 32), instead of
            one forward per batch of windows (as a prefill computes). Slower: use with --max_tokens.
    """
    if batch_size < 1:
        raise InvalidArgument("batch_size", f"must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 2:
        raise InvalidArgument("max_tokens", f"must be >= 2, got {max_tokens}")
    if "int4" in modes:
        for group_size in group_sizes:
            check_int4_group_size(group_size)
    convert_if_needed(checkpoint_dir)
    tokens, about = file_tokens(checkpoint_dir, files) if files else held_out_tokens(checkpoint_dir, data_dir)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
        about["tokens"] = len(tokens)
    about["decode"] = decode
    print_table(evaluate(checkpoint_dir, modes, tokens, group_sizes, batch_size, decode), about)


if __name__ == "__main__":
    run_cli(main)
