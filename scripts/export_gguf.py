"""Export a converted checkpoint as a GGUF file for llama.cpp (bf16, q8_0 or q4_0)."""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_gpt.cli import run_cli
from lit_gpt.convert import convert_if_needed
from lit_gpt.gguf_export import GgufType, export_gguf


def main(checkpoint_dir: Path, gguf_type: GgufType = "bf16", output: Optional[Path] = None) -> None:
    """Write the checkpoint as one GGUF file that llama.cpp (and llama-cpp-python, ollama, LM Studio...) loads, with
    the tokenizer and chat template inside: Phi-1/1.5/2 as llama.cpp's phi2 architecture, Phi-3/3.5, Phi-4-mini and
    phi-4 as its phi3.

    bf16 keeps the weights as they are; q8_0 and q4_0 are llama.cpp's blocks of 32 weights with one fp16 scale
    (8.5 and 4.5 bits a weight: phi-2 in 2.96 and 1.57 GB). Tensors are written one at a time, the file is renamed
    into place only when complete.

    Args:
        checkpoint_dir: Directory holding lit_config.json, lit_model.pth and tokenizer.json (Hugging Face weights
            alone are converted first, as generate does).
        gguf_type: bf16, q8_0 or q4_0.
        output: The file to write (default: CHECKPOINT_DIR/gguf/<its name>-<gguf_type>.gguf, where
            scripts/benchmark.py --llama_cpp True looks for it).
    """
    convert_if_needed(checkpoint_dir)
    out = export_gguf(checkpoint_dir, gguf_type, output)
    print(f"wrote {out} ({out.stat().st_size / 1e9:.2f} GB)", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
