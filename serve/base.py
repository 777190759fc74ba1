"""Serve a Phi model over an OpenAI-compatible HTTP API, with continuous batching."""

import signal
import sys
from functools import partial
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_gpt.cli import LoadOptions, load_for_inference, open_checkpoint, run_cli
from lit_gpt.prompts import StyleName, render_messages, style_for_checkpoint
from lit_gpt.utils import InvalidArgument


def main(
    checkpoint_dir: Path = Path("checkpoints/microsoft/phi-2"),
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 8,
    max_seq_length: Optional[int] = None,
    max_queue: int = 64,
    api_key: Optional[str] = None,
    prompt_style: Optional[StyleName] = None,
    grace_period: float = 30.0,
    options: LoadOptions = LoadOptions(),
) -> None:
    """Serve the model over an OpenAI-compatible API: GET /v1/models, POST /v1/completions,
    POST /v1/chat/completions, GET /health.

    Requests share each decode step (continuous batching): a new request joins the running batch at the
    next step, its prompt prefilled in chunks between the steps so that the others keep streaming, and
    leaves it when done. Sampling settings come with each request (max_tokens, temperature, top_p, seed,
    stop). SIGTERM stops accepting requests, lets those in flight finish for up to --grace_period seconds,
    and exits 0.

    Args:
        checkpoint_dir: A converted checkpoint, or one with Hugging Face weights only (converted first).
        host: Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
        port: Port to listen on.
        max_batch_size: Requests decoded together (KV cache rows).
        max_seq_length: Tokens per request, prompt included (default: the model's context; for a longrope model,
            its original_max_position_embeddings).
        max_queue: Requests that may wait for a free row; beyond that the answer is 429 with Retry-After.
        api_key: Require `Authorization: Bearer KEY` on /v1/ routes.
        prompt_style: How chat messages become a prompt (default: the checkpoint's chat template, else the style
            of its model's name).
        grace_period: Seconds that requests in flight get to finish after SIGTERM.
    """
    from contextlib import asynccontextmanager

    import uvicorn

    from lit_gpt.batching import Engine, serving_context
    from lit_gpt.device import free_memory, kv_cache_bytes
    from lit_gpt.generate import compile_decode
    from lit_gpt.server import Service, make_app

    for name, value in (("port", port), ("max_batch_size", max_batch_size), ("max_queue", max_queue)):
        if value < (0 if name == "max_queue" else 1):
            raise InvalidArgument(name, f"must be {'>= 0' if name == 'max_queue' else 'positive'}, got {value}")
    if not 0 <= grace_period < float("inf"):
        raise InvalidArgument("grace_period", f"must be a number of seconds >= 0, got {grace_period}")
    device, precision, dtype, tokenizer, config = open_checkpoint(checkpoint_dir, options)
    context = serving_context(config, max_seq_length)
    need, free = kv_cache_bytes(config, max_batch_size, context, dtype), free_memory(device)
    if need > free:
        raise InvalidArgument("max_batch_size", f"is too large: {max_batch_size} rows of {context} tokens need "
                              f"{need / 1e9:.1f} GB of KV cache but {free / 1e9:.1f} GB are free; use fewer rows "
                              "or a lower --max_seq_length")
    style = style_for_checkpoint(checkpoint_dir, prompt_style)
    model = load_for_inference(checkpoint_dir, options, device, precision, dtype)
    engine = Engine(model, tokenizer, max_batch_size, context, max_queue,
                    decode_forward=compile_decode(model) if options.compile else None)
    service = Service(engine, Path(checkpoint_dir).name, partial(render_messages, style),
                      chat_stops=style.stop_sequences)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = make_app(service, api_key, lifespan)
    print(f"Serving {service.model_id} on http://{host}:{port}/v1 ({max_batch_size} rows of {context} tokens, "
          f"prompt style {style.name})", file=sys.stderr, flush=True)
    # uvicorn handles SIGTERM and SIGINT while it serves (graceful shutdown), then raises the signal again for the
    # handler that was there before: run_cli's would turn that into exit 143, but this shutdown was the orderly one
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace_period)


if __name__ == "__main__":
    run_cli(main)
