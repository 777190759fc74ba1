"""Pretraining a Phi-architecture model from scratch on Lightning Fabric (one device, DDP or FSDP, any node count).

What a run does, in order (pretrain/base.py is the command line over it):
1. `select_corpus`, `prepare_tokenizer`, `prepare_tokens`: select the files, split train/validation by file,
   train a tokenizer (or take one), and tokenize each split once into a memory-mapped token file (rank 0;
   the others wait and map the files). `check_resume` runs before the tokens are made.
2. `build_model`: the GPT of `config` with GPT-2-style initialisation, set up by Fabric with AdamW.
3. `fit`: warmup + cosine learning rate, gradient accumulation and clipping, validation every N steps, a
   progress line, Fabric's CSV logger, a checkpoint every N steps and when stopped (Ctrl-C or SIGTERM).
   The windows of a step depend only on (seed, step), so `--resume` continues with the same data order
   and the same losses, and N processes see the same global batch as one.
4. `export`: the trained model as a standard checkpoint: Hugging Face's layout (config.json, model.safetensors,
   tokenizer files, generation_config.json) beside ours (lit_config.json, lit_model.pth).
"""

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from lit_gpt import data
from lit_gpt.config import Config
from lit_gpt.model import GPT
from lit_gpt.utils import InvalidArgument, UserError, atomic_path

Strategy = Literal["auto", "ddp", "fsdp"]
Precision = Literal["bf16-mixed", "bf16-true", "16-mixed", "16-true", "32-true"]
ExportDtype = Literal["bfloat16", "float16", "float32"]


@dataclass
class Hyperparameters:
    """Optimisation and bookkeeping settings of a run (the same for every process)."""

    global_batch_size: int = 16  # windows per optimizer step, over all processes
    micro_batch_size: int = 8  # windows per forward/backward of one process
    max_steps: int = 1000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max gradient norm (0: no clipping)
    eval_interval: int = 100  # validate every N steps
    eval_windows: int = 64  # validation windows (0: all)
    save_interval: int = 500  # checkpoint every N steps
    log_interval: int = 10  # progress line every N steps
    seed: int = 42

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per step of each process."""
        per_process, rest = divmod(self.global_batch_size, world_size)
        if rest or per_process % self.micro_batch_size:
            raise UserError(f"global_batch_size {self.global_batch_size} must be a multiple of micro_batch_size "
                            f"{self.micro_batch_size} x {world_size} process(es)")
        return per_process // self.micro_batch_size

    def lr_at(self, step: int) -> float:
        """Linear warmup to learning_rate over warmup_steps, then cosine decay to min_lr at max_steps."""
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return self.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (self.learning_rate - self.min_lr)


@dataclass
class TrainingData:
    tokenizer_dir: Path
    train: "data.np.ndarray"
    val: "data.np.ndarray"
    record: dict  # what the run trained on: file counts, hashes, token counts (saved as out_dir/data.json)


def make_fabric(devices: int, num_nodes: int, strategy: Strategy, precision: Precision, out_dir: Path):
    """A launched Fabric with a CSV logger in out_dir/logs; FSDP shards by Block and saves full checkpoints."""
    import lightning as L
    from lightning.fabric.loggers import CSVLogger

    if strategy == "fsdp":
        from lightning.fabric.strategies import FSDPStrategy

        from lit_gpt.model import Block

        strategy = FSDPStrategy(auto_wrap_policy={Block}, state_dict_type="full", sharding_strategy="FULL_SHARD")
    # one version_N folder per run: a resumed run logs into the next one and leaves the earlier logs as they are
    logger = CSVLogger(root_dir=str(out_dir), name="logs", flush_logs_every_n_steps=1)
    fabric = L.Fabric(devices=devices, num_nodes=num_nodes, strategy=strategy, precision=precision, loggers=logger)
    fabric.launch()
    local_processes = fabric.world_size // num_nodes
    if fabric.device.type == "cpu" and local_processes > 1:  # processes on one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))
    return fabric


def select_corpus(data_dir: Path, extensions: list[str], exclude: list[str], val_fraction: float) -> data.Corpus:
    files = data.select_files(data_dir, extensions, exclude)
    train_files, val_files = data.split_files(files, val_fraction)
    return data.Corpus(Path(data_dir), train_files, val_files)


def prepare_tokenizer(fabric, corpus: data.Corpus, out_dir: Path, tokenizer_dir: Optional[Path],
                      vocab_size: int) -> Path:
    """The given tokenizer, or one trained on the training files into out_dir/tokenizer (once, by rank 0)."""
    if tokenizer_dir is not None:
        if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
            raise InvalidArgument("tokenizer_dir", f"{tokenizer_dir} has no tokenizer.json")
        return Path(tokenizer_dir)
    tokenizer_dir = out_dir / "tokenizer"
    if fabric.global_rank == 0 and not (tokenizer_dir / "tokenizer.json").is_file():
        fabric.print(f"Training a {vocab_size}-token byte-level BPE on {len(corpus.train)} files ...")
        data.train_tokenizer(corpus.root, corpus.train, vocab_size, tokenizer_dir)
    fabric.barrier()
    return tokenizer_dir


def prepare_tokens(fabric, corpus: data.Corpus, tokenizer_dir: Path, out_dir: Path, block_size: int) -> TrainingData:
    """Each split tokenized once into out_dir/data (rank 0; the others wait), memory-mapped."""
    paths = {split: out_dir / "data" / f"{split}.bin" for split in ("train", "val")}
    names = {"train": corpus.train, "val": corpus.val}
    if fabric.global_rank == 0:
        for split in paths:
            data.tokenize_split(corpus.root, names[split], tokenizer_dir, paths[split])
    fabric.barrier()
    tokens, skipped = {}, {}
    for split in paths:
        tokens[split], skipped[split] = data.tokenize_split(corpus.root, names[split], tokenizer_dir, paths[split])
    for split, what in (("train", "training"), ("val", "validation")):
        if len(tokens[split]) <= block_size:
            raise UserError(f"the {what} split holds {len(tokens[split])} tokens, fewer than one window of "
                            f"block_size + 1 = {block_size + 1}; add files or lower the block size")
    record = {
        "data_dir": str(corpus.root.resolve()), "files": {"train": len(corpus.train), "val": len(corpus.val)},
        "skipped": skipped, "tokens": {split: int(len(t)) for split, t in tokens.items()},
        "file_list_sha256": corpus.fingerprint(), "tokenizer_sha256": data.tokenizer_fingerprint(tokenizer_dir),
        "val_files": corpus.val,
    }
    fabric.print(f"Data: {len(corpus.train) + len(corpus.val)} files ({sum(skipped.values())} skipped as binary or "
                 f"not UTF-8), {len(tokens['train']):,} training and {len(tokens['val']):,} validation tokens")
    return TrainingData(tokenizer_dir, tokens["train"], tokens["val"], record)


def init_weights(model: GPT) -> None:
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases, and residual projections scaled down by
    sqrt(2 * n_layer) so that the residual stream does not grow with depth."""
    residual_std = 0.02 / math.sqrt(2 * model.config.n_layer)
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            std = residual_std if name.endswith((".attn.proj", ".mlp.proj")) else 0.02
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.ones_(module.weight)
            torch.nn.init.zeros_(module.bias)


def build_model(fabric, config: Config, hp: Hyperparameters):
    """The model (seeded initialisation, identical on every process) and its AdamW, set up by Fabric.
    Weight decay applies to matrices only, not to biases and norms."""
    fabric.seed_everything(hp.seed, verbose=False)
    with fabric.init_module():
        model = GPT(config)
    init_weights(model)
    model = fabric.setup(model)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=(hp.beta1, hp.beta2))
    return model, fabric.setup_optimizers(optimizer)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)


@torch.no_grad()
def validate(fabric, model, val_tokens, block_size: int, micro_batch_size: int, max_windows: int) -> float:
    """Mean token loss over the validation windows, shared among the processes. Every process runs the same
    number of forwards (FSDP needs all of them in each): short shares are padded with a window of weight 0."""
    model.eval()
    offsets = data.val_offsets(len(val_tokens), block_size, max_windows or None)
    mine = offsets[fabric.global_rank::fabric.world_size]
    per_process = -(-len(offsets) // fabric.world_size)
    weights = [1.0] * len(mine) + [0.0] * (per_process - len(mine))
    mine = mine + [offsets[0]] * (per_process - len(mine))
    total = torch.zeros(2, device=fabric.device, dtype=torch.float64)  # loss sum, tokens
    for begin in range(0, per_process, micro_batch_size):
        x, y = data.get_batch(val_tokens, torch.tensor(mine[begin:begin + micro_batch_size]), block_size)
        x, y = fabric.to_device(x), fabric.to_device(y)
        losses = loss_fn(model(x), y, reduction="none").view(x.size(0), -1).sum(dim=1).double()
        w = torch.tensor(weights[begin:begin + micro_batch_size], device=fabric.device, dtype=torch.float64)
        total += torch.stack(((losses * w).sum(), w.sum() * block_size))
    total = fabric.all_reduce(total, reduce_op="sum")
    model.train()
    return float(total[0] / total[1])


def train_step(fabric, model, optimizer, train_tokens, hp: Hyperparameters, step: int, block_size: int) -> float:
    """One optimizer step on the step's global batch (this process's share, in micro-batches); returns the
    batch's mean loss over all processes."""
    accumulation = hp.accumulation(fabric.world_size)
    offsets = data.batch_offsets(len(train_tokens), block_size, hp.global_batch_size, hp.seed, step)
    per_process = hp.global_batch_size // fabric.world_size
    mine = offsets[fabric.global_rank * per_process:(fabric.global_rank + 1) * per_process]
    for group in optimizer.param_groups:
        group["lr"] = hp.lr_at(step)
    total = torch.zeros((), device=fabric.device, dtype=torch.float64)
    for i in range(accumulation):
        x, y = data.get_batch(train_tokens, mine[i * hp.micro_batch_size:(i + 1) * hp.micro_batch_size], block_size)
        x, y = fabric.to_device(x), fabric.to_device(y)
        with fabric.no_backward_sync(model, enabled=i < accumulation - 1):
            loss = loss_fn(model(x), y)
            fabric.backward(loss / accumulation)
        total += loss.detach().double()
    if hp.grad_clip > 0:
        fabric.clip_gradients(model, optimizer, max_norm=hp.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(fabric.all_reduce(total / accumulation, reduce_op="mean"))


class StopRequest:
    """Ctrl-C and SIGTERM during training set a flag; the loop stops after the step it is in, saves a
    checkpoint, and every process agrees on the step (an interrupt inside optimizer.step() would leave the
    weights half-updated)."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self.previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handler(self, signum, frame) -> None:
        self.signal = signum

    def agreed(self, fabric) -> bool:
        return fabric.strategy.reduce_boolean_decision(self.signal is not None, all=False)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step-{step:07d}.pth"


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    found = sorted((out_dir / "checkpoints").glob("step-*.pth"))
    return found[-1] if found else None


def save_checkpoint(fabric, out_dir: Path, state: dict) -> Path:
    """Write the checkpoint of state["step"] under a temporary name, rename it into place, then remove the older
    ones. Where writing fails (disk full, ...), the previous checkpoint stays as it was."""
    path = checkpoint_path(out_dir, state["step"])
    tmp = path.with_name(f".{path.name}.tmp")
    if fabric.global_rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fabric.save(tmp, state)
        failed = None
    except (OSError, RuntimeError) as e:
        failed = e
    if fabric.strategy.reduce_boolean_decision(failed is not None, all=False):
        if fabric.global_rank == 0:
            tmp.unlink(missing_ok=True)
        previous = latest_checkpoint(out_dir)
        kept = f"; {previous} is intact" if previous else ""
        raise UserError(f"cannot write the checkpoint {path} ({_os_reason(failed)}){kept}")
    if fabric.global_rank == 0:
        os.replace(tmp, path)
        for old in (out_dir / "checkpoints").glob("step-*.pth"):
            if old != path:
                old.unlink()
    fabric.barrier()
    return path


def _os_reason(e: Optional[BaseException]) -> str:
    if e is None:
        return "failed on another process"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def check_resume(path: Path, config: Config, tokenizer_dir: Path) -> None:
    """The run being resumed must have the model and tokenizer of the checkpoint (training longer, with
    another --max_steps, is fine)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        theirs, their_tokenizer = saved["config"], saved["tokenizer_sha256"]
    except Exception as e:
        raise UserError(f"cannot read the checkpoint {path} ({_os_reason(e)}); resume from another one")
    ours = asdict(config)
    for key in ours:
        if ours[key] != theirs.get(key):
            raise UserError(f"{path} was trained with {key}={theirs.get(key)!r}, not {ours[key]!r}; resume with the "
                            "same model options as the run that wrote it")
    if their_tokenizer != data.tokenizer_fingerprint(tokenizer_dir):
        raise UserError(f"{path} was trained with another tokenizer; resume with the same tokenizer")


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def fit(fabric, model, optimizer, tdata: TrainingData, hp: Hyperparameters, out_dir: Path,
        resume: Optional[Path]) -> dict:
    """Train from step 0, or from the checkpoint `resume`, to hp.max_steps. Returns the final state (step,
    tokens seen, training seconds, last losses); on Ctrl-C/SIGTERM saves a checkpoint and raises
    KeyboardInterrupt."""
    config = model.config if hasattr(model, "config") else model.module.config
    state = {"model": model, "optimizer": optimizer, "step": 0, "tokens": 0, "seconds": 0.0,
             "config": asdict(config), "hyperparameters": asdict(hp),
             "tokenizer_sha256": tdata.record["tokenizer_sha256"]}
    if resume is not None:  # (checked by check_resume)
        fabric.load(resume, state)
        fabric.print(f"Resuming from {resume} at step {state['step']}")
    elif hp.eval_interval:
        val_loss = validate(fabric, model, tdata.val, config.block_size, hp.micro_batch_size, hp.eval_windows)
        fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(val_loss)}, step=0)
        fabric.print(f"step 0 | val loss {val_loss:.4f} | val ppl {math.exp(val_loss):.2f}")
    tokens_per_step = hp.global_batch_size * config.block_size
    stop = StopRequest()
    try:
        return _loop(fabric, model, optimizer, tdata, hp, out_dir, state, stop, tokens_per_step)
    finally:
        stop.restore()


def _loop(fabric, model, optimizer, tdata, hp, out_dir, state, stop, tokens_per_step) -> dict:
    block_size = state["config"]["block_size"]
    t_window, steps_in_window = time.perf_counter(), 0
    while state["step"] < hp.max_steps:
        t0 = time.perf_counter()
        step = state["step"]
        loss = train_step(fabric, model, optimizer, tdata.train, hp, step, block_size)
        state["step"], state["tokens"] = step + 1, state["tokens"] + tokens_per_step
        state["seconds"] += time.perf_counter() - t0
        state["loss"] = loss
        fabric.log_dict({"loss": loss, "lr": hp.lr_at(step), "tokens": state["tokens"]}, step=state["step"])
        steps_in_window += 1
        if state["step"] % hp.log_interval == 0 or state["step"] == hp.max_steps:
            elapsed = time.perf_counter() - t_window
            rate = steps_in_window * tokens_per_step / elapsed
            eta = (hp.max_steps - state["step"]) * elapsed / steps_in_window
            fabric.print(f"step {state['step']}/{hp.max_steps} | loss {loss:.4f} | lr {hp.lr_at(step):.2e} | "
                         f"{rate:,.0f} tok/s | {state['tokens'] / 1e6:.1f}M tokens | ETA {_eta(eta)}")
            t_window, steps_in_window = time.perf_counter(), 0
        if hp.eval_interval and (state["step"] % hp.eval_interval == 0 or state["step"] == hp.max_steps):
            t_val = time.perf_counter()
            val_loss = validate(fabric, model, tdata.val, block_size, hp.micro_batch_size, hp.eval_windows)
            state["val_loss"] = val_loss
            fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(val_loss)}, step=state["step"])
            fabric.print(f"step {state['step']} | val loss {val_loss:.4f} | val ppl {math.exp(val_loss):.2f}")
            t_window += time.perf_counter() - t_val  # validation is not counted in tokens/s
        interrupted = stop.agreed(fabric)
        if interrupted or state["step"] % hp.save_interval == 0 or state["step"] == hp.max_steps:
            path = save_checkpoint(fabric, out_dir, state)
            if interrupted:
                fabric.print(f"Stopped at step {state['step']}; saved {path}. Continue with the same command and "
                             "--resume True", file=sys.stderr)
                raise KeyboardInterrupt
    return state


def export(checkpoint: Path, tokenizer_dir: Path, out_dir: Path, dtype: ExportDtype = "bfloat16") -> Path:
    """The model of a training checkpoint as a standard checkpoint directory: Hugging Face's layout (config.json,
    model.safetensors, generation_config.json, tokenizer files) beside ours (lit_config.json, lit_model.pth)."""
    import shutil

    from lit_gpt.convert import save_hf_checkpoint
    from lit_gpt.tokenizer import Tokenizer

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    config = Config(**saved["config"])
    state_dict = {k: v.to(getattr(torch, dtype)) for k, v in saved["model"].items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", data.TOKENIZER_CONFIG):
        with atomic_path(out_dir / name) as tmp:
            shutil.copyfile(Path(tokenizer_dir) / name, tmp)
    tokenizer = Tokenizer(out_dir)
    with atomic_path(out_dir / "generation_config.json") as tmp:
        tmp.write_text(json.dumps({"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}, indent=2))
    save_hf_checkpoint(state_dict, config, out_dir, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    with atomic_path(out_dir / "lit_model.pth") as tmp:
        torch.save(state_dict, tmp)
    with atomic_path(out_dir / "lit_config.json") as tmp:
        config.to_json(tmp)
    return out_dir
