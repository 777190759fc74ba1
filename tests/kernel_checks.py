"""What the tests of our C kernels share: whether they can be built here, and a spy on the calls they took."""

import os
import shutil

import pytest

from lit_gpt import gemv

BUILDABLE = gemv._cpu_has_flags() and shutil.which(os.environ.get("CC", "cc")) is not None
needs_kernels = pytest.mark.skipif(not BUILDABLE, reason="needs a CPU with AVX-512 BF16/VNNI/VBMI and a C compiler")


class Spy:
    """Counts the calls to a gemv function that the kernels took (returned a result, not None), passing them
    through to the real one."""

    def __init__(self, monkeypatch, name: str) -> None:
        self.calls, real = 0, getattr(gemv, name)

        def spy(*args, **kwargs):
            result = real(*args, **kwargs)
            self.calls += result is not None
            return result

        monkeypatch.setattr(gemv, name, spy)
