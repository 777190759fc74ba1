import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests run from a plain clone too, not only after `pip install -e .`


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
