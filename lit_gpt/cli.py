"""The command line of every script: parsing (jsonargparse, from the function's signature and docstring), and
errors as one line that names the flag or the command that fixes them.

Nothing else in lit_gpt/ knows about flags or scripts: the library raises `UserError`s that say what is wrong
(`InvalidArgument` names a parameter, `NotConverted` / `NotDownloaded` a checkpoint that lacks files), and
`error_line` turns them into what a user types.
"""

import dataclasses
import sys
from pathlib import Path
from typing import Callable

from lit_gpt.utils import InvalidArgument, NotConverted, NotDownloaded, UserError, first_line

CONVERT = "python scripts/convert_hf_checkpoint.py --checkpoint_dir {dir}"
DOWNLOAD = "python scripts/download.py --repo_id {repo_id}"


def hub_repo_id(checkpoint_dir: Path) -> str:
    """checkpoints/<org>/<name> -> "<org>/<name>" (what the download script takes)."""
    parts = Path(checkpoint_dir).resolve().parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else "<org>/<name>"


def error_line(e: UserError) -> str:
    """The one line a script prints for a library error (after "error: ")."""
    if isinstance(e, InvalidArgument):
        return f"--{e.name} {e.problem}"
    if isinstance(e, NotConverted):
        return f"{e}; convert it with `{CONVERT.format(dir=e.checkpoint_dir)}`"
    if isinstance(e, NotDownloaded):
        command = DOWNLOAD.format(repo_id=hub_repo_id(e.checkpoint_dir))
        return f"{e}; get {'it' if e.tokenizer_only else 'them'} with `{command}" \
               f"{' --tokenizer_only True' if e.tokenizer_only else ''}`"
    return str(e)


def run_cli(fn: Callable) -> None:
    """Run `fn` as a command line: one flag per parameter, documented by its docstring. A parameter whose
    type is a dataclass (options shared by several scripts, such as `GenerationOptions`) contributes its
    fields as flags of their own, documented by the dataclass's docstring.

    A UserError ends as one line on stderr and exit code 1; running out of memory (host or GPU) too; Ctrl-C
    exits with 130 and a short notice instead of a traceback.
    """
    try:
        kwargs = parse(fn, sys.argv[1:])
        fn(**kwargs)
    except UserError as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
    except Exception as e:
        torch = sys.modules.get("torch")  # (download does not import it)
        if isinstance(e, MemoryError) or (torch is not None and isinstance(e, torch.OutOfMemoryError)):
            print(f"error: out of memory: {first_line(e)}", file=sys.stderr)
            raise SystemExit(1)
        raise


def parse(fn: Callable, args: list[str]) -> dict:
    """The keyword arguments of `fn` from command-line `args` (jsonargparse exits on bad ones, with usage)."""
    import inspect

    from jsonargparse import ActionConfigFile, ArgumentParser

    signature = inspect.signature(fn)
    grouped = {name: p.annotation for name, p in signature.parameters.items()
               if dataclasses.is_dataclass(p.annotation)}
    parser = ArgumentParser(prog=Path(sys.argv[0]).name, description=_description(fn))
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML or JSON file of options (flags after it win).")
    parser.add_function_arguments(fn, skip=set(grouped), as_group=False)
    for cls in grouped.values():
        parser.add_class_arguments(cls, nested_key=None, as_group=False)
    values = parser.parse_args(args).as_dict()
    values.pop("config", None)
    for name, cls in grouped.items():
        values[name] = cls(**{f.name: values.pop(f.name) for f in dataclasses.fields(cls) if f.name in values})
    return values


def _description(fn: Callable) -> str:
    """The docstring without its Args section (the flags' own help says that)."""
    from docstring_parser import parse as parse_docstring

    doc = parse_docstring(fn.__doc__ or "")
    return "\n\n".join(part for part in (doc.short_description, doc.long_description) if part)
