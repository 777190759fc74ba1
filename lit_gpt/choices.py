"""The choices the options offer, each spelled in one place (a leaf module: no torch, no project imports).

Scripts type their options with these `Literal`s, so `--help` lists the choices and a bad value is refused
before any work; the library checks the same names with `check_choice` when it is called directly.
"""

from typing import Literal, get_args

from lit_gpt.utils import InvalidArgument

# how the weights are held and computed in at inference (Lightning Fabric's names)
Precision = Literal["bf16-true", "16-true", "32-true"]
# how a conversion stores the weights (torch's names)
DtypeName = Literal["bfloat16", "float16", "float32"]
# weight-only quantization at load: ours (CPU and CUDA), and bitsandbytes' through Fabric (CUDA only)
QuantizeMode = Literal["int8", "int4", "bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8"]
OWN_QUANTIZE_MODES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what both int4 kernels (CPU, CUDA tinygemm) accept
# a row of the benchmark and of the quality table: the weights as bf16 or fp32, or quantized (on bf16)
WeightMode = Literal["bf16", "fp32", "int8", "int4"]

PRECISION_OF_MODE = {"bf16": "bf16-true", "fp32": "32-true", "int8": "bf16-true", "int4": "bf16-true"}


def check_choice(name: str, value: object, choices) -> None:
    """InvalidArgument unless `value` is one of `choices` (a Literal type or a tuple)."""
    allowed = get_args(choices) or tuple(choices)
    if value not in allowed:
        raise InvalidArgument(name, f"must be one of {', '.join(map(str, allowed))}, got {value!r}")
