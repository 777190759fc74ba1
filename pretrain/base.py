"""Pretrain a Phi-architecture model from scratch on a folder of text or code files, on Lightning Fabric."""

import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_gpt.config import Config
from lit_gpt.pretrain import (
    ExportDtype, Hyperparameters, Precision, Strategy, build_model, check_resume, export, fit, latest_checkpoint,
    make_fabric, prepare_tokenizer, prepare_tokens, select_corpus,
)
from lit_gpt.cli import run_cli
from lit_gpt.utils import UserError, atomic_path


def main(
    data_dir: Path,
    out_dir: Path = Path("out/pretrain"),
    extensions: list[str] = [".py"],
    exclude: list[str] = [],
    val_fraction: float = 0.02,
    tokenizer_dir: Optional[Path] = None,
    vocab_size: int = 8192,
    model_name: Optional[str] = None,
    model_config: Optional[Path] = None,
    n_layer: Optional[int] = None,
    n_head: Optional[int] = None,
    n_embd: Optional[int] = None,
    n_query_groups: Optional[int] = None,
    intermediate_size: Optional[int] = None,
    block_size: Optional[int] = None,
    rotary_percentage: Optional[float] = None,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Strategy = "auto",
    precision: Precision = "bf16-mixed",
    global_batch_size: int = 16,
    micro_batch_size: int = 8,
    max_tokens: Optional[int] = None,
    max_steps: Optional[int] = None,
    learning_rate: float = 1e-3,
    min_lr: float = 1e-4,
    warmup_steps: int = 100,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    eval_interval: int = 100,
    eval_windows: int = 64,
    save_interval: int = 500,
    log_interval: int = 10,
    seed: int = 42,
    resume: Union[bool, Path] = False,
    export_dtype: ExportDtype = "bfloat16",
) -> None:
    """Train a Phi model (parallel attention + MLP on one LayerNorm, partial rotary) from scratch.

    The files under --data_dir with the given extensions are split into training and validation by file,
    a byte-level BPE tokenizer is trained on the training files (unless --tokenizer_dir gives one), and both
    splits are tokenized once into memory-mapped files under OUT_DIR/data. Training logs a progress line
    and OUT_DIR/logs/version_N/metrics.csv (N counts the runs: a resumed run logs into the next), validates every --eval_interval steps, keeps the newest checkpoint
    in OUT_DIR/checkpoints (also on Ctrl-C or SIGTERM), and writes the trained model to OUT_DIR/final in
    Hugging Face's layout (loadable by transformers) beside lit_config.json and lit_model.pth.

    Args:
        data_dir: Folder of text or code files (searched recursively).
        out_dir: Where the tokenizer, token files, logs, checkpoints and the final model go.
        extensions: File extensions to train on.
        exclude: Glob patterns of relative paths to leave out (e.g. "test/*" "*/tests/*").
        val_fraction: Share of the files held out for validation (chosen by a hash of each path).
        tokenizer_dir: Use the tokenizer.json in this folder (e.g. Phi's) instead of training one.
        vocab_size: Vocabulary of the trained tokenizer (with <|endoftext|>).
        model_name: Start from a named config (phi-1, phi-1_5, phi-2).
        model_config: Start from a JSON config (our lit_config.json or a Hugging Face config.json).
        n_layer: Number of blocks.
        n_head: Attention heads.
        n_embd: Embedding size.
        n_query_groups: Key/value heads (default: n_head).
        intermediate_size: MLP width (default: 4 x n_embd).
        block_size: Context length in tokens.
        rotary_percentage: Share of each head's dims with rotary embeddings (phi-2: 0.4).
        devices: Devices (GPUs, or CPU processes) per node.
        num_nodes: Machines.
        strategy: auto, ddp or fsdp (sharded by block, full checkpoints).
        precision: bf16-mixed, bf16-true, 16-mixed, 16-true or 32-true.
        global_batch_size: Windows of block_size tokens per optimizer step, over all processes.
        micro_batch_size: Windows per forward pass of one process (gradient accumulation makes up the rest).
        max_tokens: Train on this many tokens (sets the number of steps).
        max_steps: Or train this many optimizer steps.
        learning_rate: Peak learning rate of AdamW (beta1 0.9, beta2 0.95).
        min_lr: Learning rate at the end of the cosine decay.
        warmup_steps: Steps of linear warmup.
        weight_decay: AdamW weight decay of the matrices (not of biases and norms).
        grad_clip: Clip the gradient norm to this (0: off).
        eval_interval: Validate every N steps (0: never).
        eval_windows: Validation windows per evaluation (0: the whole validation split).
        save_interval: Save a checkpoint every N steps.
        log_interval: Print a progress line every N steps.
        seed: Seeds the initialisation and the order of the training windows.
        resume: Continue from the newest checkpoint in OUT_DIR/checkpoints (True) or from this file; the
            other options must be those of the interrupted run.
        export_dtype: Dtype of the exported weights: bfloat16, float16 or float32.
    """
    for name, value in (("devices", devices), ("num_nodes", num_nodes), ("global_batch_size", global_batch_size),
                        ("micro_batch_size", micro_batch_size), ("vocab_size", vocab_size),
                        ("log_interval", log_interval), ("save_interval", save_interval)):
        if value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    for name, value in (("eval_interval", eval_interval), ("eval_windows", eval_windows),
                        ("warmup_steps", warmup_steps), ("weight_decay", weight_decay), ("grad_clip", grad_clip)):
        if not value >= 0:
            raise UserError(f"--{name} must be >= 0, got {value}")
    if not (learning_rate > 0 and 0 <= min_lr <= learning_rate):
        raise UserError(f"need --learning_rate > 0 and 0 <= --min_lr <= --learning_rate, got {learning_rate}, {min_lr}")
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    if not vocab_size > 256:
        raise UserError(f"--vocab_size must be > 256 (the byte alphabet and <|endoftext|>), got {vocab_size}")
    if (max_tokens is None) == (max_steps is None):
        raise UserError("give exactly one of --max_tokens and --max_steps")
    out_dir = Path(out_dir)
    config = _model_config(model_name, model_config, dict(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_query_groups=n_query_groups,
        intermediate_size=intermediate_size, block_size=block_size, rotary_percentage=rotary_percentage))
    if max_steps is None:
        max_steps = max_tokens // (global_batch_size * config.block_size)
    if max_steps < 1:
        raise UserError(f"--max_tokens {max_tokens} is less than one step of {global_batch_size} x "
                        f"{config.block_size} tokens")
    hp = Hyperparameters(
        global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, max_steps=max_steps,
        learning_rate=learning_rate, min_lr=min_lr, warmup_steps=warmup_steps, weight_decay=weight_decay,
        grad_clip=grad_clip, eval_interval=eval_interval, eval_windows=eval_windows, save_interval=save_interval,
        log_interval=log_interval, seed=seed)
    hp.accumulation(devices * num_nodes)  # check the batch sizes before any work

    resume_from = None
    if resume:
        resume_from = latest_checkpoint(out_dir) if resume is True else Path(resume)
        if resume_from is None or not resume_from.is_file():
            raise UserError(f"--resume: no checkpoint {'in ' + str(out_dir / 'checkpoints') if resume is True else resume_from}"
                            "; start without --resume")
    elif latest_checkpoint(out_dir) is not None:
        raise UserError(f"{out_dir} holds checkpoints of an earlier run; continue it with --resume True or choose "
                        "another --out_dir")

    corpus = select_corpus(data_dir, extensions, exclude, val_fraction)
    fabric = make_fabric(devices, num_nodes, strategy, precision, out_dir)
    tokenizer_dir = prepare_tokenizer(fabric, corpus, out_dir, tokenizer_dir, vocab_size)
    config = _with_vocab(config, tokenizer_dir)
    if resume_from is not None:
        check_resume(resume_from, config, tokenizer_dir)
    tdata = prepare_tokens(fabric, corpus, tokenizer_dir, out_dir, config.block_size)
    n_params = _count_params(config)
    fabric.print(f"Model: {n_params / 1e6:.2f}M parameters ({config.n_layer} layers, {config.n_embd} wide, "
                 f"{config.n_head} heads, context {config.block_size}, vocabulary {config.padded_vocab_size}); "
                 f"{max_steps} steps of {global_batch_size} x {config.block_size} tokens")
    model, optimizer = build_model(fabric, config, hp)
    t0 = time.perf_counter()
    state = fit(fabric, model, optimizer, tdata, hp, out_dir, resume_from)
    if fabric.global_rank == 0:
        final = export(latest_checkpoint(out_dir), tdata.tokenizer_dir, out_dir / "final", export_dtype)
        record = {
            "python": platform.python_version(), "command": sys.argv, "parameters": n_params,
            "data": {"extensions": extensions, "exclude": exclude, "val_fraction": val_fraction, **tdata.record}, "hyperparameters": asdict(hp), "precision": precision,
            "world_size": fabric.world_size, "steps": state["step"], "tokens_seen": state["tokens"],
            "training_seconds": round(state["seconds"], 1), "final_loss": state.get("loss"),
            "final_val_loss": state.get("val_loss"),
        }
        with atomic_path(final / "training.json") as tmp:
            tmp.write_text(json.dumps(record, indent=2))
        fabric.print(f"Trained {state['tokens']:,} tokens in {time.perf_counter() - t0:.0f} s; wrote {final}")


def _model_config(model_name: Optional[str], model_config: Optional[Path], flags: dict) -> Config:
    """A named config, a JSON file, or the flags alone; flags that are set override the first two."""
    overrides = {k: v for k, v in flags.items() if v is not None}
    for key, value in overrides.items():
        if not value > 0:
            raise UserError(f"--{key} must be > 0, got {value}")
    if model_name is not None and model_config is not None:
        raise UserError("give --model_name or --model_config, not both")
    if model_name is not None:
        return Config.from_name(model_name, **overrides)
    if model_config is not None:
        path = Path(model_config)
        try:
            is_hf = "model_type" in json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"--model_config: cannot read {path} ({e})")
        return Config.from_hf_config(path, **overrides) if is_hf else Config.from_json(path, **overrides)
    missing = [k for k in ("n_layer", "n_head", "n_embd", "block_size") if k not in overrides]
    if missing:
        raise UserError(f"give --model_name, --model_config, or at least --{', --'.join(missing)}")
    return Config(name="custom", hf_config={}, **overrides)


def _with_vocab(config: Config, tokenizer_dir: Path) -> Config:
    """The config with the tokenizer's vocabulary; the embedding and head rows padded to a multiple of 64."""
    from lit_gpt.tokenizer import Tokenizer

    vocab = Tokenizer(tokenizer_dir).vocab_size
    return Config(**{**asdict(config), "vocab_size": vocab, "padded_vocab_size": -(-vocab // 64) * 64})


def _count_params(config: Config) -> int:
    import torch

    from lit_gpt.model import GPT

    with torch.device("meta"):
        return sum(p.numel() for p in GPT(config).parameters())


if __name__ == "__main__":
    run_cli(main)
