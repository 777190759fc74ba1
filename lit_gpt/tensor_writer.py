"""A torch.save-compatible writer that takes a state dict one tensor at a time."""

import io
import pickle
import sys
from collections import OrderedDict
from pathlib import Path

import torch


class IncrementalTensorWriter:
    """Writes a torch.save-compatible state dict one tensor at a time.

    torch.save pickles the whole dict at once, so every tensor would have to be in memory together.
    Here each tensor's bytes go into the zip archive as soon as it is added; only small
    placeholders are pickled at the end. The result loads with torch.load(weights_only=True, mmap=True).
    """

    def __init__(self, path: Path) -> None:
        # torch writes through our file object: a full disk or any other write error then reaches us as the
        # OSError it is (with a path given, torch reports only "iostream error")
        self.file = open(path, "wb")
        self.zip = torch._C.PyTorchFileWriter(self.file)
        self.tensors: dict[str, _SavedTensor] = OrderedDict()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().cpu().contiguous()
        if tensor.storage_offset() != 0 or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()  # a view into a bigger storage: write only its own bytes
        key = str(len(self.tensors))
        self.zip.write_record(f"data/{key}", tensor.untyped_storage(), tensor.nbytes)
        self.tensors[name] = _SavedTensor(key, tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.numel())

    def close(self) -> None:
        class Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, _SavedStorage):
                    return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
                return None

        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(self.tensors)
        data = buf.getvalue()
        self.zip.write_record("data.pkl", data, len(data))
        self.zip.write_record(".format_version", "1", 1)
        self.zip.write_record(".storage_alignment", "64", 2)
        self.zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self.zip.write_end_of_file()

    def __enter__(self) -> "IncrementalTensorWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None:
                self.close()
            else:
                try:  # the caller discards the file; finishing it here keeps torch from finishing it in its
                    # destructor, which aborts the process when the archive is broken
                    self.zip.write_end_of_file()
                except RuntimeError:
                    pass
        finally:
            self.file.close()


class _SavedStorage:
    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.numel = key, numel
        # the legacy typed-storage class (e.g. torch.BFloat16Storage) is how torch.save names dtypes
        self.storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[dtype])


class _SavedTensor:
    def __init__(self, key, dtype, shape, stride, numel) -> None:
        self.storage = _SavedStorage(key, dtype, numel)
        self.shape, self.stride = shape, stride

    def __reduce_ex__(self, protocol):
        # unpickles as the tensor itself, exactly as torch.save writes tensors
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, self.stride, False, OrderedDict())
