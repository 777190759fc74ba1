"""Benchmark generation: ours in each precision/quantization against transformers, on the same weights."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_gpt.benchmark import benchmark
from lit_gpt.cli import run_cli

if __name__ == "__main__":
    run_cli(benchmark)
