import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests run from a plain clone too, not only after `pip install -e .`

# Some tests press Ctrl-C on a child process (chat, download). A shell starts a background job
# (`bash .ci/run &`) with SIGINT ignored, children inherit that, and Python then installs no
# KeyboardInterrupt handler: give the children the default disposition whatever started pytest.
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on one thread: on the machine's two shared cores, small ops on 2 threads mostly wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory) -> Path:
    """The shipped demo model (demo/phi-stdlib: Hugging Face files, as a fresh clone has them), converted in a
    temporary copy."""
    from lit_gpt.convert import convert_hf_checkpoint

    d = tmp_path_factory.mktemp("demo") / "phi-stdlib"
    shutil.copytree(ROOT / "demo" / "phi-stdlib", d, ignore=shutil.ignore_patterns("lit_*", "gguf"))
    convert_hf_checkpoint(d, show_progress=False)
    return d
