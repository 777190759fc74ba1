"""The command line of every script: parsing (jsonargparse, from the function's signature and docstring), and
errors as one line that names the flag or the command that fixes them.

Nothing else in lit_gpt/ knows about flags or scripts: the library raises `UserError`s that say what is wrong
(`InvalidArgument` names a parameter, `NeedsStep` a step a checkpoint needs first), and
`error_line` turns them into what a user types.
"""

import dataclasses
import errno
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from lit_gpt.choices import Precision, QuantizeMode
from lit_gpt.utils import InvalidArgument, NeedsStep, UserError, first_line

COMMANDS = {  # NeedsStep.step -> the command that does it
    "download": "python scripts/download.py --repo_id {repo_id}",
    "download_tokenizer": "python scripts/download.py --repo_id {repo_id} --tokenizer_only True",
    "convert": "python scripts/convert_hf_checkpoint.py --checkpoint_dir {dir}",
    "quantize": "python scripts/quantize.py --checkpoint_dir {dir}",
}


def hub_repo_id(checkpoint_dir: Path) -> str:
    """checkpoints/<org>/<name> -> "<org>/<name>" (what the download script takes)."""
    parts = [p for p in Path(checkpoint_dir).resolve().parts if p != "/"]
    return "/".join(parts[-2:]) if len(parts) >= 2 else "<org>/<name>"


def error_line(e: UserError) -> str:
    """The one line a script prints for a library error (after "error: ")."""
    if isinstance(e, InvalidArgument):
        return f"--{e.name} {e.problem.replace('{name}', '--' + e.name)}"
    if isinstance(e, NeedsStep):
        command = COMMANDS[e.step].format(dir=e.checkpoint_dir, repo_id=hub_repo_id(e.checkpoint_dir))
        return f"{e} with `{command}`"
    return str(e)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanups run as for Ctrl-C (but chat does not take it for a
    request to stop a reply)."""


def run_cli(fn: Callable) -> None:
    """Run `fn` as a command line: one flag per parameter, documented by its docstring. A parameter whose
    type is a dataclass (options shared by several scripts, such as `LoadOptions`) contributes its
    fields as flags of their own, documented by the dataclass's docstring.

    A UserError, an OS error (disk full, read-only, permission, a file where a directory belongs) and running
    out of memory end as one line on stderr and exit code 1. Ctrl-C exits with 130 and SIGTERM with 143, after
    the same cleanups (no half-written file stays); a closed stdout (`| head`) ends quietly.
    """
    signal.signal(signal.SIGTERM, _terminate)
    try:
        kwargs = parse(fn, sys.argv[1:])
        fn(**kwargs)
    except UserError as e:
        _fail(error_line(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
    except Terminated:
        print("terminated", file=sys.stderr)
        raise SystemExit(143)
    except BrokenPipeError:
        # the reader went away: nothing more can be shown, and Python's final flush must not complain either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141)
    except OSError as e:
        _fail(os_error_line(e))
    except Exception as e:
        if _out_of_memory(e):
            _fail(f"out of memory: {first_line(e)}")
        raise


def _terminate(signum, frame) -> None:
    raise Terminated()


def _fail(line: str) -> None:
    print(f"error: {line}", file=sys.stderr)
    raise SystemExit(1)


def os_error_line(e: OSError) -> str:
    """An OS error as what it means for the user."""
    where = e.filename or "a file"
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"cannot write {where}: {e.strerror}; free some space and run the command again"
    if e.errno == errno.EROFS:
        return f"cannot write {where}: the file system is read-only; choose another directory"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {where}"
    if e.errno == errno.ENOTDIR:
        return f"{where}: a file stands where the path needs a directory"
    if e.errno == errno.EISDIR:
        return f"{where} is a directory, not a file"
    if e.errno == errno.ENOENT:
        return f"{where} does not exist"
    return f"{where}: {e.strerror or first_line(e)}"


def _out_of_memory(e: Exception) -> bool:
    """Running out of memory: Python's MemoryError, torch's OutOfMemoryError, or a CPU allocation that torch
    reports as a plain RuntimeError."""
    torch = sys.modules.get("torch")  # (download does not import it)
    if isinstance(e, MemoryError) or (torch is not None and isinstance(e, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)


def parse(fn: Callable, args: list[str]) -> dict:
    """The keyword arguments of `fn` from command-line `args`; a bad value is a UserError naming the flag."""
    import inspect

    from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

    signature = inspect.signature(fn)
    grouped = {name: p.annotation for name, p in signature.parameters.items()
               if dataclasses.is_dataclass(p.annotation)}
    # no abbreviations: a misspelt flag (--temperatur) must be an error, not silently another flag
    parser = ArgumentParser(prog=Path(sys.argv[0]).name, description=_description(fn), exit_on_error=False,
                            allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML or JSON file of options (flags after it win).")
    parser.add_function_arguments(fn, skip=set(grouped), as_group=False)
    for cls in grouped.values():
        parser.add_class_arguments(cls, nested_key=None, as_group=False)
    try:
        values = parser.parse_args(args).as_dict()
    except ArgumentError as e:
        raise UserError(_bad_argument(str(e), _annotations(signature, grouped)))
    values.pop("config", None)
    for name, cls in grouped.items():
        values[name] = cls(**{f.name: values.pop(f.name) for f in dataclasses.fields(cls) if f.name in values})
    return values


def _annotations(signature, grouped: dict) -> dict:
    types = {name: p.annotation for name, p in signature.parameters.items() if name not in grouped}
    for cls in grouped.values():
        types.update({f.name: f.type for f in dataclasses.fields(cls)})
    return types


def _bad_argument(message: str, types: dict) -> str:
    """jsonargparse's multi-line complaint as one line that names the flag (and the choices of a Literal)."""
    import re
    import typing

    key = re.search(r'[Kk]ey "([^"]+)"', message)
    value = re.search(r"(?:Given|Got) value: (.*)", message)
    if key is None:
        return f"{first_line(Exception(message))} (see --help)"
    name = key.group(1)
    given = value.group(1).strip() if value else "?"
    choices = [a for arg in typing.get_args(types.get(name)) or () for a in (typing.get_args(arg) or ())]
    if typing.get_origin(types.get(name)) is typing.Literal:
        choices = list(typing.get_args(types[name]))
    if typing.get_origin(types.get(name)) is list and "Expected a <class 'list'>" in message:
        return f"--{name}: expects a list such as '[{', '.join(map(str, choices[:2]))}]', got {given!r}"
    if choices:
        return f"--{name}: unknown value {given!r}; choose one of {', '.join(map(str, choices))}"
    return f"--{name}: invalid value {given!r} (expected {_type_name(types.get(name))})"


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _description(fn: Callable) -> str:
    """The docstring without its Args section (the flags' own help says that)."""
    from docstring_parser import parse as parse_docstring

    doc = parse_docstring(fn.__doc__ or "")
    return "\n\n".join(part for part in (doc.short_description, doc.long_description) if part)


@dataclasses.dataclass
class SamplingOptions:
    """How generate and chat sample (the server takes these per request).

    Args:
        top_k: Sample only from the k most likely tokens (null: all).
        top_p: Sample only from the most likely tokens that make up this much probability (1: off).
        temperature: Divides the logits before sampling; 0 is greedy decoding.
    """

    top_k: Optional[int] = 200
    top_p: float = 1.0
    temperature: float = 0.8

    def __post_init__(self) -> None:
        from lit_gpt.generate import check_sampling

        check_sampling(self.temperature, self.top_k, self.top_p)

    def as_kwargs(self) -> dict:
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


@dataclasses.dataclass
class LoadOptions:
    """How generate, chat and the server load the model and run it.

    Args:
        precision: 32-true, bf16-true or 16-true (default: bf16 where the GPU or CPU supports it, else 16
            on a GPU and 32 on a CPU).
        compile: Compile the decode step with torch.compile (slow first steps, faster after).
        quantize: Weight-only quantization at load: int8 (per output channel) or int4 (group-wise), on CPU
            and GPU; or the bitsandbytes modes bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8 (CUDA only).
        group_size: Inputs per scale for --quantize int4: 32, 64, 128 or 256 (smaller: more accurate, larger file).
    """

    precision: Optional[Precision] = None
    compile: bool = False
    quantize: Optional[QuantizeMode] = None
    group_size: int = 32


def open_checkpoint(checkpoint_dir: Path, options: LoadOptions):
    """What generate, chat and the server do before loading the weights: choose the device and precision,
    convert a directory that has only Hugging Face weights, and read the tokenizer and the config (so that
    a prompt can be checked against the context first). Returns (device, precision, dtype, tokenizer, config)."""
    from lit_gpt.config import Config
    from lit_gpt.convert import convert_if_needed
    from lit_gpt.device import choose_device
    from lit_gpt.files import LIT_CONFIG
    from lit_gpt.tokenizer import Tokenizer

    device, precision, dtype = choose_device(options.precision)
    convert_if_needed(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    return device, precision, dtype, tokenizer, Config.from_json(Path(checkpoint_dir) / LIT_CONFIG)


def load_for_inference(checkpoint_dir: Path, options: LoadOptions, device, precision: str, dtype):
    """The model, loaded (and quantized) as the options say, with one line on stderr."""
    from lit_gpt.load import load_model

    t0 = time.perf_counter()
    model = load_model(checkpoint_dir, device=device, dtype=dtype, quantize=options.quantize,
                       group_size=options.group_size)
    print(f"Loaded {checkpoint_dir} on {device.type} in {precision} in {time.perf_counter() - t0:.2f} s",
          file=sys.stderr)
    return model


def unescape(text: str) -> str:
    r"""Turn the two-character escapes \n, \t and \\ into a newline, a tab and a backslash (shells pass them raw)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def clean_text(text: str) -> str:
    """Text from the command line or a terminal with any bytes that are not UTF-8 (which Python keeps as lone
    surrogates) replaced by U+FFFD, so that they can be tokenized."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
