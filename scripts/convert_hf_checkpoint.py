"""Convert a Hugging Face Phi checkpoint (Phi-1 to phi-4) into lit_config.json + lit_model.pth."""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_gpt.convert import convert_hf_checkpoint
from lit_gpt.choices import DtypeName
from lit_gpt.cli import run_cli


def main(checkpoint_dir: Path, model_name: Optional[str] = None, dtype: Optional[DtypeName] = None) -> None:
    """Convert the Hugging Face checkpoint in a directory into our format, in place.

    Reads sharded or single safetensors (memory-mapped) or .bin files in any of the naming schemes Phi
    checkpoints have had (Phi-1/1.5/2's three, and the later family's: Phi-3, Phi-3.5, Phi-4-mini, phi-4),
    and writes lit_config.json and lit_model.pth beside them.

    Args:
        checkpoint_dir: Directory holding config.json and the weights, e.g. checkpoints/microsoft/phi-2.
        model_name: Use this named config (phi-2, Phi-3-mini-4k-instruct, phi-4, ...) instead of deriving it from
            config.json.
        dtype: Store the weights as float32, float16 or bfloat16 (default: as in the checkpoint).
    """
    out = convert_hf_checkpoint(checkpoint_dir, model_name=model_name, dtype=dtype)
    print(f"wrote {out} and {out.with_name('lit_config.json')}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
