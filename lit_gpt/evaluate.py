"""Quality on held-out text: loss, perplexity and top-1 next-token accuracy, in each precision/quantization.

The text is what a model trained with pretrain/ never saw: the validation files named in its training.json,
tokenized as training did (eos after each file) and cut into non-overlapping windows of the model's context.
Every window is one full forward (as a prefill computes), or with `decode` one KV-cached step per token (as
generation computes: one row at a time, which on CPU goes through the decode kernels; for int8/int4 these round
the activations to 8 bits per block of 32). A quantized mode is also compared with bf16 token by token (top-1
agreement).
"""

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from lit_gpt import data
from lit_gpt.choices import WeightMode
from lit_gpt.utils import UserError

def held_out_tokens(checkpoint_dir: Path, data_dir: Optional[Path] = None) -> tuple[torch.Tensor, dict]:
    """The validation files of the run that trained the checkpoint (its training.json), as one token stream,
    with a description. `data_dir` replaces the folder recorded there (the same files elsewhere)."""
    from lit_gpt.tokenizer import Tokenizer

    path = Path(checkpoint_dir) / "training.json"
    try:
        record = json.loads(path.read_text())["data"]
        names, recorded_dir = record["val_files"], record["data_dir"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read the held-out files from {path} ({e}); evaluate a checkpoint written by "
                        "pretrain/base.py, or pass the text files to score")
    root = Path(data_dir or recorded_dir)
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise UserError(f"{len(missing)} held-out file(s) are not under {root} (e.g. {missing[0]}); point the data "
                        "directory at the folder the model was trained on")
    tokenizer = Tokenizer(checkpoint_dir)
    ids: list[int] = []
    skipped: list[str] = []
    for text in data.iter_texts(root, names, skipped):
        ids.extend(tokenizer.encode(text).tolist() + [tokenizer.eos_id])
    about = {"root": str(root), "files": len(names) - len(skipped), "tokens": len(ids)}
    return torch.tensor(ids, dtype=torch.int64), about


def file_tokens(checkpoint_dir: Path, files: Sequence[Path]) -> tuple[torch.Tensor, dict]:
    """Any text files as one token stream (eos after each), for checkpoints that were not trained here."""
    from lit_gpt.tokenizer import Tokenizer

    tokenizer = Tokenizer(checkpoint_dir)
    ids: list[int] = []
    for path in files:
        text = data.read_text(path)
        if text is None:
            raise UserError(f"{path} is binary or not UTF-8 text")
        ids.extend(tokenizer.encode(text).tolist() + ([tokenizer.eos_id] if tokenizer.eos_id is not None else []))
    return torch.tensor(ids, dtype=torch.int64), {"files": len(files), "tokens": len(ids)}


@torch.inference_mode()
def score(model, tokens: torch.Tensor, block_size: int, batch_size: int = 8) -> dict:
    """Summed loss, correct top-1 predictions and the predicted ids over non-overlapping windows of
    `block_size + 1` tokens (each window predicts its last `block_size` tokens from the ones before)."""
    offsets = data.val_offsets(len(tokens), block_size)
    if not offsets:
        raise UserError(f"the text holds {len(tokens)} tokens, fewer than one window of {block_size + 1}")
    device = model.lm_head.weight.device
    loss_sum, correct, predictions = 0.0, 0, []
    for begin in range(0, len(offsets), batch_size):
        rows = torch.stack([tokens[o:o + block_size + 1] for o in offsets[begin:begin + batch_size]]).to(device)
        logits = model(rows[:, :-1]).float()
        targets = rows[:, 1:]
        loss_sum += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"))
        predicted = logits.argmax(dim=-1)
        correct += int((predicted == targets).sum())
        predictions.append(predicted.cpu())
    n = len(offsets) * block_size
    return {"loss": loss_sum / n, "ppl": math.exp(loss_sum / n), "top1": correct / n, "tokens": n,
            "predicted": torch.cat(predictions)}


@torch.inference_mode()
def score_decode(model, tokens: torch.Tensor, block_size: int) -> dict:
    """As `score`, but each window is fed one token at a time through the KV cache, as a decode step computes it."""
    offsets = data.val_offsets(len(tokens), block_size)
    if not offsets:
        raise UserError(f"the text holds {len(tokens)} tokens, fewer than one window of {block_size + 1}")
    device = model.lm_head.weight.device
    model.set_kv_cache(1, max_seq_length=block_size)
    loss_sum, correct, predictions = 0.0, 0, []
    for o in offsets:
        row = tokens[o:o + block_size + 1].to(device)
        logits = torch.cat([model(row[t:t + 1].view(1, 1), torch.tensor([t], device=device))[0].float()
                            for t in range(block_size)])  # the cache is overwritten from position 0 each window
        loss_sum += float(F.cross_entropy(logits, row[1:], reduction="sum"))
        predicted = logits.argmax(dim=-1)
        correct += int((predicted == row[1:]).sum())
        predictions.append(predicted.cpu())
    model.clear_kv_cache()
    n = len(offsets) * block_size
    return {"loss": loss_sum / n, "ppl": math.exp(loss_sum / n), "top1": correct / n, "tokens": n,
            "predicted": torch.cat(predictions)}


def evaluate(checkpoint_dir: Path, modes: Sequence[WeightMode], tokens: torch.Tensor, group_sizes: Sequence[int] = (32,),
             batch_size: int = 8, decode: bool = False) -> list[dict]:
    """Score the checkpoint in each mode (int4 once per group size); quantized and fp32 rows also get their
    top-1 agreement with the bf16 row (bf16 is scored first whenever another mode is asked for). With `decode`,
    token by token through the KV cache (`score_decode`)."""
    from lit_gpt.load import load_model

    runs = [(m, g) for m in modes for g in (group_sizes if m == "int4" else (None,))]
    if any(m != "bf16" for m, _ in runs) and ("bf16", None) in runs:
        runs.remove(("bf16", None))
        runs.insert(0, ("bf16", None))
    rows, reference = [], None
    for mode, group in runs:
        dtype = torch.float32 if mode == "fp32" else torch.bfloat16
        quantize = mode if mode in ("int8", "int4") else None
        model = load_model(checkpoint_dir, "cpu", dtype, quantize=quantize, group_size=group or 32, use_saved=False)
        if decode:
            result = score_decode(model, tokens, model.config.block_size)
        else:
            result = score(model, tokens, model.config.block_size, batch_size)
        predicted = result.pop("predicted")
        if mode == "bf16":
            reference = predicted
        elif reference is not None:
            result["agreement"] = float((predicted == reference).float().mean())
        rows.append({"mode": mode if group is None else f"int4 g{group}", **result})
    return rows


def print_table(rows: list[dict], about: dict) -> None:
    bf16 = next((r for r in rows if r["mode"] == "bf16"), None)
    how = ", token by token through the KV cache" if about.get("decode") else ""
    print(f"\n{about['tokens']:,} held-out tokens in {about['files']} files, scored in windows of the model's "
          f"context{how} ({rows[0]['tokens']:,} predictions)\n")
    print("| mode | loss | perplexity | vs bf16 | top-1 accuracy | top-1 agreement with bf16 |\n|---|---|---|---|---|---|")
    for r in rows:
        versus = f"{100 * (r['ppl'] / bf16['ppl'] - 1):+.2f}%" if bf16 and r is not bf16 else "-"
        agree = f"{100 * r['agreement']:.1f}%" if "agreement" in r else "-"
        print(f"| {r['mode']} | {r['loss']:.4f} | {r['ppl']:.3f} | {versus} | {100 * r['top1']:.2f}% | {agree} |")
