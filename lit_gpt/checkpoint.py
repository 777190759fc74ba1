"""Moved: lit_gpt.convert (conversion), lit_gpt.load (loading), lit_gpt.quantized_checkpoint, lit_gpt.tensor_writer.

Kept only while the last importers move over; removed before this change lands.
"""

from lit_gpt.convert import convert_hf_checkpoint, convert_if_needed, convert_lit_checkpoint  # noqa: F401
from lit_gpt.load import expected_shapes, load_model  # noqa: F401
