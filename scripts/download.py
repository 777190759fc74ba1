"""Download a Phi checkpoint (config, tokenizer, weights) from the Hugging Face Hub; resumable and verified."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_gpt.download import download
from lit_gpt.cli import run_cli

if __name__ == "__main__":
    run_cli(download)
