"""Convert a lit checkpoint back into a directory that transformers loads."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_gpt.convert import convert_lit_checkpoint
from lit_gpt.cli import run_cli


def main(checkpoint_dir: Path, output_dir: Path) -> None:
    """Write config.json, model.safetensors and the tokenizer files in transformers' current Phi format.

    The result loads with transformers.AutoModelForCausalLM.from_pretrained(output_dir) and
    AutoTokenizer.from_pretrained(output_dir).

    Args:
        checkpoint_dir: Directory holding lit_config.json and lit_model.pth.
        output_dir: Where to write the Hugging Face files (created if needed; not the checkpoint directory itself,
            whose config.json the export would overwrite).
    """
    out = convert_lit_checkpoint(checkpoint_dir, output_dir)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
