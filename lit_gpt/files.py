"""The names of the files a checkpoint directory holds: the Hub's layout and ours. A leaf module (no imports of
the project), read by download, conversion, loading and the scripts alike."""

# ours, written by conversion
LIT_MODEL = "lit_model.pth"
LIT_CONFIG = "lit_config.json"

# the Hub's
HF_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
CONFIG_FILES = (HF_CONFIG, GENERATION_CONFIG)
# (chat_template.jinja: where newer transformers save the chat template, instead of tokenizer_config.json)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json", "chat_template.jinja")
WEIGHT_KINDS = {  # kind -> (file suffix, index file)
    "safetensors": (".safetensors", "model.safetensors.index.json"),
    "bin": (".bin", "pytorch_model.bin.index.json"),
}
NOT_WEIGHTS = ("training_args.bin",)  # a .bin some fine-tunes ship that holds no weights

# what a run of pretrain/ records beside the model it exports
TRAINING_RECORD = "training.json"


def is_weight_file(name: str, kind: str) -> bool:
    return name.endswith(WEIGHT_KINDS[kind][0]) and name not in NOT_WEIGHTS


def quantized_model_name(mode: str, group_size: int) -> str:
    """Where scripts/quantize.py saves a quantized model: lit_model.int8.pth or lit_model.int4-g<group_size>.pth
    (and a .json beside it that says what it was made from)."""
    return "lit_model.int8.pth" if mode == "int8" else f"lit_model.int4-g{group_size}.pth"
