"""A small, hackable PyTorch toolkit for Microsoft's Phi models (phi-1, phi-1_5, phi-2)."""

__all__ = ["Config", "GPT", "Tokenizer"]


def __getattr__(name: str):
    # imported on first use: torch takes seconds to import and scripts such as download.py do not need it
    if name == "Config":
        from lit_gpt.config import Config

        return Config
    if name == "GPT":
        from lit_gpt.model import GPT

        return GPT
    if name == "Tokenizer":
        from lit_gpt.tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'lit_gpt' has no attribute {name!r}")
