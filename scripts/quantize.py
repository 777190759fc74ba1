"""Quantize a converted checkpoint once and save it, so that generate and chat load it in seconds."""

import sys
import time
from pathlib import Path
from typing import Literal, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from lit_gpt.choices import Precision
from lit_gpt.cli import run_cli
from lit_gpt.device import DTYPE_OF_PRECISION, default_precision
from lit_gpt.load import load_model
from lit_gpt.quantize import check_int4_group_size
from lit_gpt.quantized_checkpoint import save_quantized


def main(checkpoint_dir: Path, quantize: Literal["int8", "int4"] = "int4", group_size: int = 32,
         precision: Optional[Precision] = None) -> None:
    """Quantize lit_model.pth (weight-only int8 or int4) and save the model beside it.

    Writes lit_model.int8.pth or lit_model.int4-g<group_size>.pth and a .json that says what it was made
    from. `--quantize` with the same mode, group size and precision in generate/base.py and chat/base.py
    then loads it on the CPU instead of quantizing at load (phi-2 int4: ~2 s instead of ~12 s), as long as
    lit_model.pth is unchanged. int4 is saved in this torch's packed CPU layout:
    under another torch or CPU build they quantize at load again, with a note.

    Args:
        checkpoint_dir: A converted checkpoint (lit_config.json, lit_model.pth), e.g. checkpoints/microsoft/phi-2.
        quantize: int8 (per output channel) or int4 (group-wise).
        group_size: int4 only: inputs per (scale, zero) pair: 32, 64, 128 or 256.
        precision: Of the scales, biases, embedding and norms, as generate's --precision: bf16-true, 16-true
            or 32-true (default: what generate uses on this CPU, bf16-true where it has native bf16).
    """
    if quantize == "int4":
        check_int4_group_size(group_size)  # before loading anything
    dtype = DTYPE_OF_PRECISION[precision or default_precision(torch.device("cpu"))]
    t0 = time.perf_counter()
    model = load_model(checkpoint_dir, "cpu", dtype, quantize=quantize, group_size=group_size, use_saved=False,
                       show_progress=True, huge_pages=False)
    out = save_quantized(model, checkpoint_dir)
    print(f"wrote {out} ({out.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
