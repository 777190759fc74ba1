"""Speed and memory of generation, ours in several precisions/quantizations against transformers and llama.cpp, in
one run.

Each configuration runs in its own child process, so load time and peak resident memory are its own.
The machine's memory read bandwidth is measured in the same run, as the yardstick for decode speed:
at batch 1 a decode step reads every weight once, so tokens/s x bytes per step is the bandwidth used.
"""

import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from lit_gpt.choices import WeightMode, check_choice
from lit_gpt.device import default_device, sync
from lit_gpt.files import HF_CONFIG, LIT_CONFIG, LIT_MODEL
from lit_gpt.utils import InvalidArgument, NeedsStep

PROMPT = "def print_prime(n):\n    \"\"\"\n    Print all primes between 1 and n\n    \"\"\"\n"
# a long prompt (prompt_tokens) is PROMPT, then this body as often as it takes, cut to the number of tokens
PROMPT_BODY = ("    primes = []\n    for num in range(2, n + 1):\n        for p in primes:\n"
               "            if num % p == 0:\n                break\n        else:\n            primes.append(num)\n"
               "    for p in primes:\n        print(p)\n    return primes\n\n\ndef print_prime_again(n):\n")
LLAMA_CPP_TYPES = ("bf16", "q8_0", "q4_0")  # llama.cpp's rows, on our GGUF exports of the same weights
LLAMA_CPP_PEER = {"bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}  # our mode -> llama.cpp's type of its size


def prompt_ids(encode: Callable[[str], list[int]], prompt_tokens: Optional[int] = None) -> list[int]:
    """The benchmark's prompt as token ids: PROMPT (27 tokens with Phi's tokenizer), or `prompt_tokens` ids of
    PROMPT and PROMPT_BODY repeated (for prefill speed on a long prompt)."""
    if prompt_tokens is None:
        return encode(PROMPT)
    repeats = 1
    while len(ids := encode(PROMPT + PROMPT_BODY * repeats)) < prompt_tokens:
        repeats *= 2
    return ids[:prompt_tokens]


def read_bandwidth(device: torch.device = torch.device("cpu"), gigabytes: float = 2.0, repeats: int = 7) -> float:
    """GB/s of a sum over a float32 tensor far larger than the caches, in the memory of `device` (median of
    `repeats`; on a GPU 4x the size, as its sum of 2 GB takes well under a millisecond)."""
    if device.type == "cuda":
        gigabytes *= 4
    x = torch.ones(int(gigabytes * 1e9) // 4, device=device)
    x.sum()  # touch every page once
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        x.sum()
        sync(device)
        times.append(time.perf_counter() - t0)
    gbps = x.nbytes / statistics.median(times) / 1e9
    del x
    if device.type == "cuda":
        torch.cuda.empty_cache()  # (the runs, in their own processes, need that memory back)
    return gbps


def peak_rss() -> int:
    """Peak resident memory of this process, in bytes (memory-mapped weights that were read included)."""
    return _status_kb("VmHWM") * 1024


def rss() -> int:
    """Resident memory of this process now, in bytes."""
    return _status_kb("VmRSS") * 1024


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _model_bytes(model: torch.nn.Module) -> int:
    """Bytes of everything the model holds: weights (quantized or not), KV cache, rotary tables, masks."""
    return sum(t.nbytes for t in model.parameters()) + sum(t.nbytes for t in model.buffers())


def _timed_tokens(run) -> tuple[float, list[float]]:
    """Call `run(on_token)`; return the start time and the time of every token."""
    stamps: list[float] = []
    t0 = time.perf_counter()
    run(lambda: stamps.append(time.perf_counter()))
    return t0, stamps


def _summary(t0: float, stamps: list[float], prompt_len: int, step_bytes: int) -> dict:
    ttft = stamps[0] - t0
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return dict(ttft=ttft, prefill_tps=prompt_len / ttft, decode_tps=decode, step_gb=step_bytes / 1e9,
                gbps=decode * step_bytes / 1e9, new_tokens=len(stamps), prompt_tokens=prompt_len)


def bench_ours(checkpoint_dir: str, mode: WeightMode, max_new_tokens: int, compile: bool, group_size: int,
               prompt_tokens: Optional[int] = None) -> dict:
    """Greedy generation with our model: `mode` is bf16, fp32, int8 or int4 (int ones on bf16 activations).
    (Quality is scripts/evaluate.py's: these weights are random.)"""
    from lit_gpt.load import load_model
    from lit_gpt.device import decode_step_bytes
    from lit_gpt.generate import compile_decode, generate_tokens
    from lit_gpt.tokenizer import Tokenizer

    device = default_device()
    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    start_rss = rss()  # the interpreter, torch and our modules, before any weight
    t0 = time.perf_counter()
    # quantized at load, whether or not scripts/quantize.py saved a quantized model there: the load times
    # stay comparable between checkpoints and runs
    model = load_model(checkpoint_dir, device=device, dtype=dtype, quantize=None if mode in ("bf16", "fp32") else mode,
                       group_size=group_size, use_saved=False)
    load_s = time.perf_counter() - t0
    tokenizer = Tokenizer(checkpoint_dir)
    ids = torch.tensor(prompt_ids(lambda text: tokenizer.encode(text).tolist(), prompt_tokens), device=device)
    total = len(ids) + max_new_tokens
    model.set_kv_cache(1, max_seq_length=total)
    forward = compile_decode(model) if compile else None

    def run(on_token) -> None:
        for token in generate_tokens(model, ids, total, temperature=0.0, decode_forward=forward):
            token.item()  # wait for the device, as a user printing the token would
            on_token()

    first = _summary(*_timed_tokens(run), len(ids), decode_step_bytes(model))  # cold: pages, compilation
    steady = _summary(*_timed_tokens(run), len(ids), decode_step_bytes(model))
    result = dict(steady, ttft=first["ttft"], load_s=load_s, peak_rss=peak_rss(), start_rss=start_rss,
                  model_bytes=_model_bytes(model), device=device.type,
                  peak_cuda=torch.cuda.max_memory_allocated() if device.type == "cuda" else None)
    return result


def bench_transformers(hf_dir: str, max_new_tokens: int, prompt_tokens: Optional[int] = None) -> dict:
    """transformers' generate (PhiForCausalLM, Phi3ForCausalLM) on the same weights, bf16, greedy, with a
    token-timing streamer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    device = default_device()
    start_rss = rss()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).to(device).eval()
    load_s = time.perf_counter() - t0
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    ids = torch.tensor([prompt_ids(lambda text: tokenizer(text)["input_ids"], prompt_tokens)], device=device)
    pad_id = tokenizer.eos_token_id  # (a batch of one is never padded; generate wants one within the vocabulary)

    class Stamps(BaseStreamer):
        def __init__(self, on_token) -> None:
            self.on_token, self.prompt_seen = on_token, False

        def put(self, value) -> None:
            if self.prompt_seen:  # the first put is the prompt itself
                self.on_token()
            self.prompt_seen = True

        def end(self) -> None:
            pass

    def run(on_token) -> None:
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                       min_new_tokens=max_new_tokens, streamer=Stamps(on_token), pad_token_id=pad_id)

    step_bytes = sum(p.nbytes for n, p in model.named_parameters() if "embed_tokens" not in n)
    if model.config.tie_word_embeddings:  # (named_parameters names the head by the embedding, which it is)
        step_bytes += model.lm_head.weight.nbytes
    first = _summary(*_timed_tokens(run), ids.shape[1], step_bytes)
    steady = _summary(*_timed_tokens(run), ids.shape[1], step_bytes)
    return dict(steady, ttft=first["ttft"], load_s=load_s, peak_rss=peak_rss(), start_rss=start_rss,
                model_bytes=_model_bytes(model), device=device.type,
                peak_cuda=torch.cuda.max_memory_allocated() if device.type == "cuda" else None)


def bench_llama_cpp(gguf_path: str, checkpoint_dir: str, max_new_tokens: int, weight_bytes: int, step_bytes: int,
                    prompt_tokens: Optional[int] = None) -> dict:
    """llama.cpp (through llama-cpp-python) on our GGUF export of the same weights: greedy, the prompt's ids from our
    tokenizer (llama.cpp's give the same, tests/test_gguf.py), on as many threads as torch uses here.
    `weight_bytes`/`step_bytes`: the file's tensors, and those a decode step reads (the embedding by one row)."""
    from llama_cpp import Llama

    from lit_gpt.config import Config
    from lit_gpt.device import kv_cache_bytes
    from lit_gpt.tokenizer import Tokenizer

    tokenizer = Tokenizer(checkpoint_dir)
    ids = prompt_ids(lambda text: tokenizer.encode(text).tolist(), prompt_tokens)
    threads = torch.get_num_threads()  # llama-cpp-python's default would be half the CPUs
    device = default_device()  # beside ours: on the GPU where there is one (_llama_cpp_runs checks that it can)
    start_rss = rss()
    device_used = _device_memory_used(device)  # (its allocations are not torch's: the device's count is the measure)
    t0 = time.perf_counter()
    llm = Llama(gguf_path, n_ctx=len(ids) + max_new_tokens, n_batch=512, n_threads=threads, n_threads_batch=threads,
                n_gpu_layers=-1 if device.type == "cuda" else 0, verbose=False)
    load_s = time.perf_counter() - t0

    def run(on_token) -> None:
        llm.reset()  # else generate() would reuse the prompt cached by the previous run and skip the prefill
        for n, _ in enumerate(llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0), start=1):
            on_token()
            if n == max_new_tokens:
                break

    first = _summary(*_timed_tokens(run), len(ids), step_bytes)
    steady = _summary(*_timed_tokens(run), len(ids), step_bytes)
    config = Config.from_json(Path(checkpoint_dir) / LIT_CONFIG)
    kv_bytes = kv_cache_bytes(config, 1, llm.n_ctx(), torch.float16)  # llama.cpp's default cache: f16, n_ctx rounded up
    return dict(steady, ttft=first["ttft"], load_s=load_s, peak_rss=peak_rss(), start_rss=start_rss,
                model_bytes=weight_bytes + kv_bytes, device=device.type,
                peak_cuda=_device_memory_used(device) - device_used if device.type == "cuda" else None)


def _device_memory_used(device: torch.device) -> int:
    """Bytes in use on a GPU, by every process (0 on the CPU)."""
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def run_child(job: dict) -> dict:
    """Run one configuration (`job`: the keyword arguments of bench_ours, bench_transformers or bench_llama_cpp,
    with "kind") in a fresh process; its last stdout line is the JSON result."""
    proc = subprocess.run([sys.executable, "-m", "lit_gpt.benchmark", json.dumps(job)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def benchmark(checkpoint_dir: Path, modes: Sequence[WeightMode] = ("bf16", "int8", "int4"), max_new_tokens: int = 64,
              compile: bool = False, group_size: int = 32, transformers: bool = True, rounds: int = 1,
              llama_cpp: bool = False, prompt_tokens: Optional[int] = None) -> list[dict]:
    """Benchmark generation with the converted checkpoint in each mode, transformers on its Hugging Face files when
    they are there, and llama.cpp on GGUF exports of it (bf16, q8_0, q4_0) where asked; every run in its own process,
    `rounds` times in rotated order. The prompt is PROMPT, or `prompt_tokens` tokens of code. Returns one row per
    configuration: the median of each figure over the rounds, and the read bandwidth around its runs; our rows with
    llama.cpp's of the same size also the median of the rounds' decode ratios to it (`vs_llama_cpp`)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / LIT_MODEL).is_file():
        raise NeedsStep(f"{checkpoint_dir} holds no converted checkpoint; convert it first", "convert", checkpoint_dir)
    for mode in modes:
        check_choice("modes", mode, WeightMode)
    if rounds < 1:
        raise InvalidArgument("rounds", f"must be at least 1, got {rounds}")
    if prompt_tokens is not None:
        _check_prompt_tokens(checkpoint_dir, prompt_tokens, max_new_tokens)
    common = dict(max_new_tokens=max_new_tokens, prompt_tokens=prompt_tokens)
    runs = [(f"ours {mode}{' +compile' if compile else ''}",
             dict(kind="ours", checkpoint_dir=str(checkpoint_dir), mode=mode, compile=compile, group_size=group_size,
                  **common))
            for mode in modes]
    if transformers and (checkpoint_dir / HF_CONFIG).is_file():
        runs.append(("transformers bf16", dict(kind="transformers", hf_dir=str(checkpoint_dir), **common)))
    if llama_cpp:
        runs += _llama_cpp_runs(checkpoint_dir, common)
    results = _rounds(runs, rounds)
    rows = [dict(name=name, **_median(runs_of_one)) for name, runs_of_one in results.items()]
    for (name, job), row in zip(runs, rows):
        peer = results.get(f"llama.cpp {LLAMA_CPP_PEER.get(job.get('mode'))}")
        if job["kind"] == "ours" and peer is not None and "error" not in row:
            # round by round: the two ran minutes apart at most, through the same swings of the read bandwidth
            ratios = [a["decode_tps"] / b["decode_tps"] for a, b in zip(results[name], peer) if "error" not in b]
            row["vs_llama_cpp"] = statistics.median(ratios) if ratios else None
    return rows


def _check_prompt_tokens(checkpoint_dir: Path, prompt_tokens: int, max_new_tokens: int) -> None:
    from lit_gpt.config import Config

    context = Config.from_json(checkpoint_dir / LIT_CONFIG).block_size
    if not 1 <= prompt_tokens <= context - max_new_tokens:
        raise InvalidArgument("prompt_tokens", f"must be 1 to {context - max_new_tokens} (the context of {context} "
                                               f"less {max_new_tokens} new tokens), got {prompt_tokens}")


def _llama_cpp_runs(checkpoint_dir: Path, common: dict) -> list[tuple[str, dict]]:
    """llama.cpp's configurations, on GGUF exports of the checkpoint in its gguf/ folder (written on the first run,
    and again when lit_model.pth changes; not timed)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        raise InvalidArgument("llama_cpp", "needs llama-cpp-python: pip install 'lit-phi[bench]' (which compiles "
                                           "llama.cpp)")
    import llama_cpp

    if default_device().type == "cuda" and not llama_cpp.llama_supports_gpu_offload():
        raise InvalidArgument("llama_cpp", "this llama-cpp-python runs on the CPU only, ours on the GPU here: "
                                           "reinstall it built for CUDA (CMAKE_ARGS='-DGGML_CUDA=on' pip install "
                                           "--force-reinstall --no-cache-dir llama-cpp-python), or leave it out")
    from lit_gpt.config import Config
    from lit_gpt.gguf_export import cached_gguf, gguf_tensor_bytes

    config = Config.from_json(checkpoint_dir / LIT_CONFIG)
    runs = []
    for gguf_type in LLAMA_CPP_TYPES:
        path = cached_gguf(checkpoint_dir, gguf_type)
        sizes = gguf_tensor_bytes(config, gguf_type)
        embedding = sizes["token_embd.weight"]
        step_bytes = sum(sizes.values()) - embedding + embedding // config.padded_vocab_size  # one row of it
        if "output.weight" not in sizes:  # a tied head: llama.cpp multiplies by the whole embedding too
            step_bytes += embedding
        job = dict(kind="llama_cpp", gguf_path=str(path), checkpoint_dir=str(checkpoint_dir),
                   weight_bytes=sum(sizes.values()), step_bytes=step_bytes, **common)
        runs.append((f"llama.cpp {gguf_type}", job))
    return runs


def _rounds(runs: list[tuple[str, dict]], rounds: int) -> dict[str, list[dict]]:
    """Every run `rounds` times, rotated. The bandwidth is measured around every run, and each run is set
    against the mean of the figures before and after it."""
    results: dict[str, list[dict]] = {name: [] for name, _ in runs}
    device = default_device()
    bandwidths = [read_bandwidth(device)]
    for r in range(rounds):
        for name, job in runs[r % len(runs):] + runs[: r % len(runs)]:
            print(f"round {r + 1}/{rounds}: read bandwidth {bandwidths[-1]:.1f} GB/s; running {name} ...",
                  file=sys.stderr)
            result = run_child(job)
            bandwidths.append(read_bandwidth(device))
            result["read_bw"] = (bandwidths[-2] + bandwidths[-1]) / 2
            if "gbps" in result:
                result["bw_share"] = result["gbps"] / result["read_bw"]
            results[name].append(result)
    return results


def _median(results: list[dict]) -> dict:
    """One row from several runs of a configuration: the median of every number (the first error, if any)."""
    failed = [r for r in results if "error" in r]
    if failed:
        return failed[0]
    row = dict(results[0])
    for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            row[key] = statistics.median(r[key] for r in results)
    return row


def print_table(rows: list[dict], checkpoint_dir: Path, max_new_tokens: int, rounds: int = 1) -> None:
    ref = next((r for r in rows if r["name"].startswith("transformers") and "error" not in r), None)
    bf16 = next((r for r in rows if r["name"].startswith("ours bf16") and "error" not in r), None)
    medians = f"; medians of {rounds} rounds" if rounds > 1 else ""
    prompt = next((f"a {r['prompt_tokens']}-token prompt, " for r in rows if "prompt_tokens" in r), "")
    gpu = any(r.get("device") == "cuda" for r in rows)
    where = "GPU memory (8 GB of float32)" if gpu else "2 GB of float32"
    memory = ("the most allocated on the GPU (llama.cpp: the device memory it held after its runs), against"
              if gpu else "peak RSS, and how far the peak rose above the process's RSS before loading (the "
                          "interpreter and torch), against")
    print(f"\n{checkpoint_dir}, batch 1, greedy, {prompt}{max_new_tokens} new tokens; read BW: a sum over {where}, "
          f"measured before and after each run{medians}. Memory: {memory} the model's bytes (weights, KV cache, "
          f"tables)\n")
    head = ("| run | load s | first token s | prefill tok/s | decode tok/s | vs our bf16 | GB/step | GB/s "
            f"| read BW GB/s | % of read BW | peak {'GPU' if gpu else 'RSS'} GB | model GB | peak rise vs model "
            "| decode vs transformers | decode vs llama.cpp, by round |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | error: {r['error']} |")
            continue
        ratio = _times(r["decode_tps"] / ref["decode_tps"]) if ref else "-"
        ours_or_llama = r["name"].startswith(("ours", "llama.cpp"))
        vs_bf16 = _times(r["decode_tps"] / bf16["decode_tps"]) if bf16 and ours_or_llama else "-"
        peak, start = (r["peak_cuda"], 0) if r.get("device") == "cuda" else (r["peak_rss"], r["start_rss"])
        rise = (peak - start) / r["model_bytes"] - 1
        vs_llama = _times(r["vs_llama_cpp"]) if r.get("vs_llama_cpp") else "-"
        print(f"| {r['name']} | {r['load_s']:.3g} | {r['ttft']:.3g} | {r['prefill_tps']:.3g} | {r['decode_tps']:.3g} "
              f"| {vs_bf16} | {r['step_gb']:.3g} | {r['gbps']:.3g} | {r['read_bw']:.3g} | {100 * r['bw_share']:.3g}% "
              f"| {peak / 1e9:.2f} | {r['model_bytes'] / 1e9:.3g} | {100 * rise:+.1f}% | {ratio} | {vs_llama} |")


def _times(ratio: float) -> str:
    """A ratio as 1.23x; under 0.01 with two significant digits (0.0039x), not as 0.00x: a run starved of CPU by
    other processes can decode hundreds of times slower (llama.cpp's threads spin while they wait)."""
    return f"{ratio:.2f}x" if ratio >= 0.01 else f"{ratio:.2g}x"


if __name__ == "__main__":  # a child run: python -m lit_gpt.benchmark '{"kind": "ours", ...}'
    job = json.loads(sys.argv[1])
    bench = {"ours": bench_ours, "transformers": bench_transformers, "llama_cpp": bench_llama_cpp}[job.pop("kind")]
    print(json.dumps(bench(**job)))
