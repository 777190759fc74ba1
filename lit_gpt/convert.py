"""Conversion between Hugging Face Phi checkpoints and ours, both ways, driven by one name table.

WEIGHT_NAMES says where each of our tensors lives in each of the naming schemes Phi checkpoints have had on the
Hub (three for Phi-1/1.5/2, one for the later family); `convert_hf_checkpoint` reads any of them (safetensors or
.bin, sharded or not, one tensor at a time) into lit_model.pth, and `save_hf_checkpoint` writes transformers'
current format back.
"""

import json
import os
import pickle
import re
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from lit_gpt.choices import DtypeName, check_choice
from lit_gpt.config import Config, configs
from lit_gpt.files import (
    GENERATION_CONFIG, HF_CONFIG, LIT_CONFIG, LIT_MODEL, NOT_WEIGHTS, TOKENIZER_FILES, WEIGHT_KINDS,
)
from lit_gpt.load import expected_shapes, load_lit_state_dict, qkv_to_lit
from lit_gpt.tensor_writer import IncrementalTensorWriter
from lit_gpt.utils import InvalidArgument, NeedsStep, UserError, atomic_path, first_line, progress

# transformers' PhiForCausalLM, the remote-code "phi-msft", the original MixFormer, and Phi3ForCausalLM (the later
# family's sequential block: its names are the only ones of that block)
SCHEMES = ("phi", "phi-msft", "mixformer-sequential", "phi3")

# lit name -> name in each scheme, in the order of SCHEMES (None: the scheme's block has no such tensor).
# Placeholders: {i} block index, {j} = i + 1 and {last} = n_layer + 1 (MixFormer is one flat Sequential:
# embedding, blocks, head), {wb} expands to "weight" and "bias" (where the model has a bias). A tuple holds q, k, v
# kept apart; a single qkv name holds them concatenated as [q; k; v] on the output dim. The later family's mlp.fc is
# gate_up_proj as it is: gate rows, then up rows.
WEIGHT_NAMES = [
    ("transformer.wte.weight",
     "model.embed_tokens.weight", "transformer.embd.wte.weight", "layers.0.wte.weight", "model.embed_tokens.weight"),
    ("transformer.h.{i}.norm_1.{wb}",
     "model.layers.{i}.input_layernorm.{wb}", "transformer.h.{i}.ln.{wb}", "layers.{j}.ln.{wb}",
     "model.layers.{i}.input_layernorm.{wb}"),
    ("transformer.h.{i}.attn.attn.{wb}",
     ("model.layers.{i}.self_attn.q_proj.{wb}", "model.layers.{i}.self_attn.k_proj.{wb}",
      "model.layers.{i}.self_attn.v_proj.{wb}"),
     "transformer.h.{i}.mixer.Wqkv.{wb}", "layers.{j}.mixer.Wqkv.{wb}", "model.layers.{i}.self_attn.qkv_proj.{wb}"),
    ("transformer.h.{i}.attn.proj.{wb}",
     "model.layers.{i}.self_attn.dense.{wb}", "transformer.h.{i}.mixer.out_proj.{wb}", "layers.{j}.mixer.out_proj.{wb}",
     "model.layers.{i}.self_attn.o_proj.{wb}"),
    ("transformer.h.{i}.norm_2.{wb}",
     None, None, None, "model.layers.{i}.post_attention_layernorm.{wb}"),
    ("transformer.h.{i}.mlp.fc.{wb}",
     "model.layers.{i}.mlp.fc1.{wb}", "transformer.h.{i}.mlp.fc1.{wb}", "layers.{j}.mlp.fc1.{wb}",
     "model.layers.{i}.mlp.gate_up_proj.{wb}"),
    ("transformer.h.{i}.mlp.proj.{wb}",
     "model.layers.{i}.mlp.fc2.{wb}", "transformer.h.{i}.mlp.fc2.{wb}", "layers.{j}.mlp.fc2.{wb}",
     "model.layers.{i}.mlp.down_proj.{wb}"),
    ("transformer.ln_f.{wb}",
     "model.final_layernorm.{wb}", "lm_head.ln.{wb}", "layers.{last}.ln.{wb}", "model.norm.{wb}"),
    ("lm_head.{wb}",
     "lm_head.{wb}", "lm_head.linear.{wb}", "layers.{last}.linear.{wb}", "lm_head.{wb}"),
]
# the rows that size a checkpoint: the embedding, the attention's output projection (one per block only), the head
_EMBEDDING, _ATTN_PROJ, _HEAD = (next(row for row in WEIGHT_NAMES if row[0].startswith(lit))
                                 for lit in ("transformer.wte.", "transformer.h.{i}.attn.proj.", "lm_head."))

# buffers some old checkpoints carry that are recomputed, not loaded
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attention.masked_bias", "attention.bias")

# safetensors' dtype names (file headers) -> torch's; the weights must be in one of FLOAT_DTYPES
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def name_map(config: Config, scheme: str) -> dict[str, tuple[str, ...]]:
    """Every lit tensor name of the model `config` describes -> its source name(s) in `scheme` (three names for
    q, k, v kept apart)."""
    col = 1 + SCHEMES.index(scheme)
    ours = expected_shapes(config)
    out: dict[str, tuple[str, ...]] = {}
    for row in WEIGHT_NAMES:
        lit, theirs = row[0], row[col]
        if theirs is None:
            continue
        theirs = theirs if isinstance(theirs, tuple) else (theirs,)
        blocks = range(config.n_layer) if "{i}" in lit else [None]
        kinds = ("weight", "bias") if "{wb}" in lit else [None]
        for i in blocks:
            for wb in kinds:
                fmt = dict(i=i, j=None if i is None else i + 1, last=config.n_layer + 1, wb=wb)
                if lit.format(**fmt) in ours:
                    out[lit.format(**fmt)] = tuple(t.format(**fmt) for t in theirs)
    return out


def detect_scheme(names: set[str]) -> str:
    """Which naming scheme a checkpoint uses, from its tensor names alone."""
    for scheme, marker in (("phi3", "model.norm.weight"), ("phi", "model.embed_tokens.weight"),  # phi3's first
                           ("phi-msft", "transformer.embd.wte.weight"),
                           ("mixformer-sequential", "layers.0.wte.weight")):
        if marker in names:
            return scheme
    sample = ", ".join(sorted(names)[:3])
    raise UserError(f"the weights are not in any known Phi naming scheme (found e.g. {sample})")


def hf_scheme(config: Config) -> str:
    """The naming scheme transformers uses today for the block `config` describes."""
    return "phi" if config.parallel_residual else "phi3"


def hf_tensors(lit_name: str, tensor: torch.Tensor, targets: tuple[str, ...],
               config: Config) -> dict[str, torch.Tensor]:
    """Our tensor under its name(s) in a scheme (`targets`, from name_map): the fused attention as q, k and v apart
    or as one [q; k; v], everything else as it is."""
    if ".attn.attn." not in lit_name:
        return {targets[0]: tensor.contiguous()}
    parts = lit_to_qkv(tensor, config)
    parts = parts if len(targets) == 3 else (torch.cat(parts),)
    return {target: part.contiguous() for target, part in zip(targets, parts)}


def lit_to_qkv(qkv: torch.Tensor, config: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, hs = config.n_query_groups, config.head_size
    q_per_kv = config.n_head // g
    grouped = qkv.reshape(g, q_per_kv + 2, hs, *qkv.shape[1:])
    q, k, v = grouped.split((q_per_kv, 1, 1), dim=1)
    rest = qkv.shape[1:]
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


class WeightFiles:
    """The tensors of a Hugging Face checkpoint directory, read one at a time from its weight files.

    Files are memory-mapped (safetensors, or .bin zip archives) but each read opens its own mapping,
    which goes away with the tensor: a mapping held for the whole run would count every page read
    so far as resident, and peak memory would grow to the size of the model. .bin files are only
    ever unpickled with weights_only=True, so a checkpoint cannot run code.
    """

    def __init__(self, checkpoint_dir: Path) -> None:
        self.files = find_weight_files(checkpoint_dir)
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}  # from the file headers, no data read
        self.dtypes: dict[str, str] = {}  # "float16", "int64", ...
        for path in self.files:
            with self._open(path) as tensors:
                for name in tensors.keys():
                    self.where[name] = path
                    self.shapes[name] = tensors.shape(name)
                    self.dtypes[name] = tensors.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        try:
            with self._open(self.where[name]) as tensors:
                return tensors.get(name)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot read {name} from {self.where[name]} ({first_line(e)}); "
                            "the file is corrupt: delete it and download the checkpoint again")

    @contextmanager
    def _open(self, path: Path) -> Iterator["_Tensors"]:
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                handle = safe_open(str(path), framework="pt")
                yield _Tensors(handle.keys, lambda n: handle.get_slice(n).get_shape(), handle.get_tensor,
                               lambda n: SAFETENSORS_DTYPES.get(handle.get_slice(n).get_dtype(),
                                                                handle.get_slice(n).get_dtype()))
            else:
                with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
                    warnings.simplefilter("ignore")
                    sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                yield _Tensors(sd.keys, lambda n: sd[n].shape, sd.__getitem__,
                               lambda n: str(sd[n].dtype).removeprefix("torch."))
        except pickle.UnpicklingError as e:
            raise UserError(f"{path} holds more than tensors and was not loaded, as it could run code "
                            f"({first_line(e)}); use a safetensors checkpoint instead")
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{path} is truncated or corrupt ({first_line(e)}); "
                            "delete it and download the checkpoint again")


class _Tensors:
    """The four things read from an open weight file, whatever its format."""

    def __init__(self, keys, shape, get, dtype) -> None:
        self.keys = keys
        self.shape = lambda name: tuple(shape(name))
        self.get = get
        self.dtype = dtype


def find_weight_files(checkpoint_dir: Path) -> list[Path]:
    checkpoint_dir = Path(checkpoint_dir)
    for suffix, index_name in WEIGHT_KINDS.values():
        pattern = f"*{suffix}"
        index = checkpoint_dir / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise NeedsStep(f"{index} is malformed ({e}); download the checkpoint again", "download", checkpoint_dir)
            missing = [s for s in shards if not (checkpoint_dir / s).is_file()]
            if missing:
                raise NeedsStep(f"shard {missing[0]} listed in {index.name} is missing from {checkpoint_dir}; run the "
                                "download again to fetch it", "download", checkpoint_dir)
            return [checkpoint_dir / s for s in shards]
        files = sorted(p for p in checkpoint_dir.glob(pattern) if p.name not in NOT_WEIGHTS)
        if files:
            return files
    raise NeedsStep(f"no weights (*.safetensors or *.bin) in {checkpoint_dir}; download them", "download", checkpoint_dir)


def convert_hf_checkpoint(
    checkpoint_dir: Path, model_name: Optional[str] = None, dtype: Optional[DtypeName] = None, show_progress: bool = True
) -> Path:
    """Convert a Hugging Face Phi checkpoint in `checkpoint_dir` into lit_config.json + lit_model.pth.

    Every name and shape is checked against the config (from config.json, or the named config `model_name`)
    before anything is written; tensors are then read, remapped and written one at a time, so memory stays
    near one tensor. `dtype` casts the weights (default: keep the checkpoint's).
    """
    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise UserError(f"{checkpoint_dir} is a file, not a checkpoint directory")
    if not checkpoint_dir.is_dir():
        raise NeedsStep(f"{checkpoint_dir} does not exist; download a checkpoint first", "download", checkpoint_dir)
    if dtype is not None:
        check_choice("dtype", dtype, DtypeName)
    weights = WeightFiles(checkpoint_dir)
    if model_name is not None:
        config = Config.from_name(model_name)
    elif (checkpoint_dir / HF_CONFIG).is_file():
        config = Config.from_hf_config(checkpoint_dir / HF_CONFIG)
    else:
        names = ", ".join(c["name"] for c in configs)
        raise InvalidArgument("model_name", f"is needed: {checkpoint_dir} has no config.json (one of {names})")
    scheme = detect_scheme(set(weights.where))
    if (scheme == "phi3") == config.parallel_residual:
        described = "Phi-1/1.5/2's" if config.parallel_residual else "Phi-3's (the later family's)"
        source = f"the named config {model_name}" if model_name else checkpoint_dir / HF_CONFIG
        raise UserError(f"the weights in {checkpoint_dir} are named as in {scheme} checkpoints, but {source} describes "
                        f"{described} block")
    _check_sizes_in_headers(weights, config, scheme, checkpoint_dir, model_name)
    names = name_map(config, scheme)
    _check_names_and_shapes(weights, names, config, scheme, checkpoint_dir)

    def converted() -> Iterator[tuple[str, torch.Tensor]]:
        for lit_name, sources in names.items():
            parts = [weights.get(s) for s in sources]
            if len(parts) == 1 and ".attn.attn." in lit_name:  # a fused [q; k; v]
                parts = parts[0].split([config.n_head * config.head_size] + 2 * [config.n_query_groups * config.head_size])
            tensor = qkv_to_lit(*parts, config) if len(parts) == 3 else parts[0]
            yield lit_name, tensor if dtype is None else tensor.to(getattr(torch, dtype))

    out = checkpoint_dir / LIT_MODEL
    with atomic_path(out) as tmp:
        with IncrementalTensorWriter(tmp) as writer:
            for lit_name, tensor in progress(converted(), len(names), "converting", show_progress):
                writer.add(lit_name, tensor)
    with atomic_path(checkpoint_dir / LIT_CONFIG) as tmp_config:  # only beside a complete lit_model.pth
        config.to_json(tmp_config)
    return out


def _layers_in_headers(weights: "WeightFiles", scheme: str, checkpoint_dir: Path) -> int:
    """How many blocks the weights hold, from their names: 0, 1, ... n - 1 each with its attention projection."""
    template = _ATTN_PROJ[1 + SCHEMES.index(scheme)]  # the attention's output projection: one per block only
    before, after = re.split(r"\{[ij]\}", template)
    pattern = re.compile(re.escape(before) + r"(\d+)" + re.escape(after.format(wb="weight")))
    offset = 1 if "{j}" in template else 0
    found = sorted({int(m.group(1)) - offset for m in map(pattern.fullmatch, weights.where) if m})
    for i, index in enumerate(found):
        if index != i:
            name = template.format(i=i, j=i + 1, wb="weight")
            raise UserError(f"tensor {name} is missing from the checkpoint in {checkpoint_dir}, which holds blocks up to "
                            f"{found[-1]}")
    return len(found)


def _check_sizes_in_headers(weights: "WeightFiles", config: Config, scheme: str, checkpoint_dir: Path,
                            model_name: Optional[str]) -> None:
    """The config's depth, width and vocabulary against the weights' headers, before anything sized by the config
    is built: a config.json of 10**9 layers would otherwise have a name map built for all of them."""
    found = {"n_layer": _layers_in_headers(weights, scheme, checkpoint_dir)}
    embedding = weights.shapes.get(_EMBEDDING[1 + SCHEMES.index(scheme)])
    if embedding is not None and len(embedding) == 2:
        found.update(n_embd=embedding[1], padded_vocab_size=embedding[0])
    wrong = "; ".join(f"{key} {value}, not {getattr(config, key)}" for key, value in found.items()
                      if getattr(config, key) != value)
    if not wrong:
        return
    if model_name is None:
        raise UserError(f"{checkpoint_dir / HF_CONFIG} does not match the weights beside it ({wrong}); fix it or "
                        "download the checkpoint again")
    fits = [c["name"] for c in configs if all(getattr(Config.from_name(c["name"]), k) == v for k, v in found.items())]
    if fits:
        raise InvalidArgument("model_name", f"{model_name} does not match the weights in {checkpoint_dir}: they are "
                                            f"{' or '.join(fits)}-sized ({wrong}); use {{name}} {fits[-1]}")
    raise InvalidArgument("model_name", f"{model_name} does not match the weights in {checkpoint_dir} ({wrong}); leave "
                                        "{name} out to use the checkpoint's config.json")


def _check_names_and_shapes(weights: "WeightFiles", names: dict, config: Config, scheme: str,
                            checkpoint_dir: Path) -> None:
    """Every tensor the config needs is there with its shape and a float dtype (from the file headers), and nothing
    else."""
    shapes = expected_shapes(config)
    wanted = [n for sources in names.values() for n in sources]
    missing = [n for n in wanted if n not in weights.where]
    if missing:
        raise UserError(f"tensor {missing[0]} is missing from the checkpoint in {checkpoint_dir} "
                        f"(expected for {config.n_layer} layers, scheme {scheme})")
    # tied embeddings: transformers ties the head to the embedding whatever the files hold under the head's name
    tied = _HEAD[1 + SCHEMES.index(scheme)].format(last=config.n_layer + 1, wb="weight")
    tied = tied if config.tie_embeddings else None
    unexpected = sorted(n for n in set(weights.where).difference(wanted) if not n.endswith(IGNORED_SUFFIXES)
                        and n != tied)
    if unexpected:
        raise UserError(f"unexpected tensor {unexpected[0]} in the checkpoint in {checkpoint_dir} "
                        f"({len(unexpected)} in all); it does not match the config")
    for name in wanted:
        if weights.dtypes[name] not in FLOAT_DTYPES:
            raise UserError(f"tensor {name} in {weights.where[name]} is {weights.dtypes[name]}; Phi's weights are "
                            f"floating point ({', '.join(FLOAT_DTYPES)}): this is not a Phi checkpoint lit-phi reads")
    for lit_name, sources in names.items():
        parts = [weights.shapes[s] for s in sources]
        fused = (sum(p[0] for p in parts), *parts[0][1:])  # q, k, v stack on the output dim
        if any(p[1:] != parts[0][1:] for p in parts) or fused != tuple(shapes[lit_name]):
            found = " + ".join(str(p) for p in parts)
            raise UserError(f"{' + '.join(sources)} has shape {found} but the config needs {tuple(shapes[lit_name])} "
                            f"for {lit_name}; the config.json does not match the weights")


def convert_if_needed(checkpoint_dir: Path) -> None:
    """Convert a directory that holds Hugging Face weights but no lit_model.pth (as litgpt does after a
    download), saying so in one line on stderr; anything else is left for loading to judge."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir() or (checkpoint_dir / LIT_MODEL).is_file():
        return
    if not (checkpoint_dir / HF_CONFIG).is_file():
        return
    try:
        find_weight_files(checkpoint_dir)
    except UserError:
        return
    print(f"{checkpoint_dir} holds Hugging Face weights but no lit_model.pth; converting it first", file=sys.stderr)
    convert_hf_checkpoint(checkpoint_dir, show_progress=False)


def convert_lit_checkpoint(checkpoint_dir: Path, output_dir: Path) -> Path:
    """Write a transformers-loadable directory (config.json, model.safetensors, tokenizer files)."""
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    if output_dir.resolve() == checkpoint_dir.resolve():
        raise InvalidArgument("output_dir", f"is the checkpoint directory {checkpoint_dir} itself: the export would "
                                            "overwrite its config.json; choose another directory")
    config = Config.from_json(checkpoint_dir / LIT_CONFIG)
    state_dict = load_lit_state_dict(checkpoint_dir, config)
    # Phi-1/1.5/2's <|endoftext|>, unless the checkpoint's tokenizer says otherwise (the later family's differ)
    bos_id = eos_id = 50256 if config.parallel_residual else None
    if (checkpoint_dir / "tokenizer.json").is_file():
        from lit_gpt.tokenizer import Tokenizer

        tokenizer = Tokenizer(checkpoint_dir)
        bos_id, eos_id = tokenizer.bos_id, tokenizer.eos_id
    output_dir.mkdir(parents=True, exist_ok=True)
    save_hf_checkpoint(state_dict, config, output_dir, bos_id, eos_id)
    for name in (GENERATION_CONFIG, *TOKENIZER_FILES):
        if (checkpoint_dir / name).is_file():
            with atomic_path(output_dir / name) as tmp:
                shutil.copyfile(checkpoint_dir / name, tmp)
    return output_dir


def save_hf_checkpoint(state_dict: dict[str, torch.Tensor], config: Config, output_dir: Path,
                       bos_id: Optional[int] = 50256, eos_id: Optional[int] = 50256) -> None:
    """model.safetensors and config.json of a lit state dict, in transformers' current format of its block."""
    hf_state_dict = {}
    for lit_name, targets in name_map(config, hf_scheme(config)).items():
        hf_state_dict.update(hf_tensors(lit_name, state_dict[lit_name], targets, config))
    with atomic_path(Path(output_dir) / "model.safetensors") as tmp:
        save_safetensors(hf_state_dict, tmp)
    dtype = next(iter(state_dict.values())).dtype
    with atomic_path(Path(output_dir) / HF_CONFIG) as tmp:
        tmp.write_text(json.dumps(hf_config_dict(config, dtype, bos_id, eos_id), indent=2))


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, with its I/O errors (a full disk...) raised as the OSError they are: the library
    reports them as a SafetensorError that carries the errno only in its text."""
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors creates its files readable by their owner only


def hf_config_dict(config: Config, dtype: torch.dtype, bos_id: Optional[int] = 50256,
                   eos_id: Optional[int] = 50256) -> dict:
    """config.json for transformers' PhiForCausalLM or (the sequential block) Phi3ForCausalLM, as the Hub has them."""
    if not config.parallel_residual:
        return _phi3_config_dict(config, dtype, bos_id, eos_id)
    return {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        **_shape_keys(config),
        "max_position_embeddings": config.block_size,
        "partial_rotary_factor": config.rotary_percentage,
        "rope_theta": float(config.rope_base),
        "layer_norm_eps": config.norm_eps,
        "hidden_act": "gelu_new",
        "qk_layernorm": False,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _shape_keys(config: Config) -> dict:
    """The config.json keys of the model's shape, which both families spell alike."""
    return {
        "vocab_size": config.padded_vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_query_groups,
    }


def _phi3_config_dict(config: Config, dtype: torch.dtype, bos_id: Optional[int], eos_id: Optional[int]) -> dict:
    rope_scaling = None
    if config.longrope:
        rope_scaling = {"type": "longrope", "short_factor": config.rope_short_factor,
                        "long_factor": config.rope_long_factor}
        if config.rope_attention_factor is not None:
            rope_scaling["attention_factor"] = config.rope_attention_factor
    head_dim = {} if config.head_size == config.n_embd // config.n_head else {"head_dim": config.head_size}
    return {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        **_shape_keys(config),
        **head_dim,
        "max_position_embeddings": config.block_size,
        "original_max_position_embeddings": config.rope_original_max_seq_len or config.block_size,
        "partial_rotary_factor": config.rotary_percentage,
        "rope_theta": float(config.rope_base),
        "rope_scaling": rope_scaling,
        "sliding_window": config.sliding_window,
        "rms_norm_eps": config.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,  # as the Hub's have it (Phi3Config's default, 32000, may lie outside the vocabulary)
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
