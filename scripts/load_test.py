"""Load-test OpenAI-compatible servers: N concurrent clients x M streaming requests, with a time limit."""

import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_gpt.cli import run_cli
from lit_gpt.utils import InvalidArgument

PROMPTS = [
    "def fibonacci(n):",
    "import os\n\n\ndef read_file(path):",
    "class Stack:\n    def __init__(self):",
    "def is_prime(n):\n    \"\"\"Return True if n is prime.\"\"\"",
    "# Parse the command line\nimport argparse\n",
    "def merge_sort(items):",
]


async def one_request(client, model: str, prompt: str, max_tokens: int, stats: dict) -> None:
    t0 = time.perf_counter()
    first, tokens, chunks = None, None, 0
    try:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                chunks += 1
                if first is None:
                    first = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        if tokens is None:  # a server that sends no usage in streams (llama-cpp-python's): a chunk a token
            tokens = chunks
            stats["counted_chunks"] = True
    except Exception as e:  # counted, and the load goes on
        stats["errors"].append(type(e).__name__)
        return
    end = time.perf_counter()
    if first is not None:
        stats["ttft"].append(first - t0)
        if tokens > 1 and end > first:
            stats["stream_tps"].append((tokens - 1) / (end - first))
    stats["tokens"] += tokens


async def client_loop(client, model: str, requests: int, max_tokens: int, index: int, stats: dict,
                      deadline: float) -> None:
    for k in range(requests):
        if time.perf_counter() > deadline:
            return
        await one_request(client, model, PROMPTS[(index + k) % len(PROMPTS)], max_tokens, stats)


async def run_load(base_url: str, model: Optional[str], clients: int, requests: int, max_tokens: int,
                   time_limit: float, api_key: str) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=time_limit)
    model = model or (await client.models.list()).data[0].id
    # one request first, not counted: the first forward reads memory-mapped weights from disk, and lazy setup runs
    await one_request(client, model, PROMPTS[0], max_tokens, {"ttft": [], "stream_tps": [], "tokens": 0, "errors": []})
    stats = {"ttft": [], "stream_tps": [], "tokens": 0, "errors": []}
    t0 = time.perf_counter()
    deadline = t0 + time_limit
    await asyncio.gather(*(client_loop(client, model, requests, max_tokens, i, stats, deadline)
                           for i in range(clients)))
    stats["seconds"] = time.perf_counter() - t0
    return stats


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def row(name: str, stats: dict, clients: int) -> str:
    aggregate = stats["tokens"] / stats["seconds"] if stats["seconds"] else float("nan")
    per_stream = statistics.median(stats["stream_tps"]) if stats["stream_tps"] else float("nan")
    return (f"| {name} | {clients} | {len(stats['ttft'])} | {percentile(stats['ttft'], 0.5):.3f} | "
            f"{percentile(stats['ttft'], 0.99):.3f} | {per_stream:.2f} | {aggregate:.2f} | {len(stats['errors'])} |")


def main(
    base_urls: list[str] = ["http://127.0.0.1:8000/v1"],
    names: Optional[list[str]] = None,
    model: Optional[str] = None,
    clients: int = 8,
    requests: int = 4,
    max_tokens: int = 64,
    time_limit: float = 300.0,
    api_key: str = "none",
) -> None:
    """Run the same load against each server, one after the other, and print a table.

    Each of --clients concurrent clients sends --requests streaming completion requests in turn (greedy,
    --max_tokens each, short code prompts), until done or --time_limit seconds have passed; one request before
    them warms the server up and is not counted. Per server:
    p50 and p99 time to first token, the median tokens/s of a stream after its first token, the aggregate
    tokens/s over the whole run, and the number of errors (a 429, a dropped connection).

    Args:
        base_urls: The servers' OpenAI base URLs, e.g. '[http://127.0.0.1:8000/v1, http://127.0.0.1:8001/v1]'.
        names: A name for each server's row (default: its URL).
        model: The model name to ask for (default: the first one /v1/models lists).
        clients: Concurrent clients.
        requests: Requests per client.
        max_tokens: Tokens per request.
        time_limit: Seconds per server; clients send no new request after it.
        api_key: Sent as the bearer token.
    """
    for name, value in (("clients", clients), ("requests", requests), ("max_tokens", max_tokens)):
        if value < 1:
            raise InvalidArgument(name, f"must be >= 1, got {value}")
    if not time_limit > 0:
        raise InvalidArgument("time_limit", f"must be > 0, got {time_limit}")
    names = names or base_urls
    if len(names) != len(base_urls):
        raise InvalidArgument("names", "needs one name per URL in --base_urls")
    lines, all_stats = [], []
    for name, url in zip(names, base_urls):
        stats = asyncio.run(run_load(url, model, clients, requests, max_tokens, time_limit, api_key))
        lines.append(row(name, stats, clients))
        all_stats.append(stats)
    print(f"\n{clients} clients x {requests} streaming requests of {max_tokens} tokens (greedy)\n")
    print("| server | clients | requests done | TTFT p50 s | TTFT p99 s | stream tok/s (median) | aggregate tok/s "
          "| errors |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    if any(stats.get("counted_chunks") for stats in all_stats):
        print("\n(tokens counted as streamed chunks where a server sends no usage counts)")


if __name__ == "__main__":
    run_cli(main)
