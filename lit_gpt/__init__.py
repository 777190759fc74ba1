"""A small, hackable PyTorch toolkit for Microsoft's Phi models (phi-1, phi-1_5, phi-2)."""

from lit_gpt.config import Config
from lit_gpt.model import GPT
from lit_gpt.tokenizer import Tokenizer

__all__ = ["Config", "GPT", "Tokenizer"]
