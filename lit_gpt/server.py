"""An OpenAI-compatible HTTP API over the continuous-batching engine (lit_gpt/batching.py), on FastAPI.

FastAPI + uvicorn rather than LitServe: LitServe batches whole requests, while the batching here happens at
every decode step inside the engine, so all that is wanted from the HTTP side is routing, validation, server-
sent events and a graceful shutdown, which FastAPI and uvicorn do well and simply.

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming as
server-sent events exactly as OpenAI sends them, or one JSON answer), with max_tokens, temperature, top_p, seed,
stop and the usage counts. Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

import asyncio
import json
import time
import uuid
from typing import Any, Callable, Optional

from lit_gpt.batching import Engine, QueueFull, Request
from lit_gpt.utils import UserError

RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _field(body: dict, name: str, kinds: tuple, default: Any = None, check: Optional[Callable] = None,
           problem: str = "") -> Any:
    """body[name], checked: of one of `kinds` (bools are not numbers) and passing `check`; else a 400."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds) or (check and not check(value)):
        raise APIError(400, f"'{name}' {problem or 'has the wrong type'}: {value!r}", param=name)
    return value


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise APIError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    return tuple(s for s in stop if s)


def sampling_fields(body: dict) -> dict:
    """max_tokens, temperature, top_p, seed and stop of a request body, validated as OpenAI does."""
    if _field(body, "n", (int,), 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    max_tokens = _field(body, "max_tokens", (int,), None, lambda v: v >= 1, "must be >= 1")
    max_tokens = _field(body, "max_completion_tokens", (int,), max_tokens, lambda v: v >= 1, "must be >= 1")
    return dict(
        max_tokens=max_tokens,
        temperature=float(_field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "must be in [0, 2]")),
        top_p=float(_field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "must be in (0, 1]")),
        seed=_field(body, "seed", (int,), None),
        stop=_stops(body),
    )


class Service:
    """What the routes need: the engine, the tokenizer, how chat messages become a prompt, the model's id."""

    def __init__(self, engine: Engine, model_id: str, render_chat: Callable[[list[dict]], str],
                 default_max_tokens: int = 256, chat_stops: tuple[str, ...] = ()) -> None:
        self.engine, self.model_id, self.render_chat = engine, model_id, render_chat
        self.default_max_tokens, self.chat_stops = default_max_tokens, chat_stops

    def request(self, prompt: str, fields: dict, extra_stops: tuple[str, ...] = ()) -> Request:
        ids = self.engine.tokenizer.encode(prompt).tolist()
        room = self.engine.context - len(ids)
        max_tokens = fields["max_tokens"] or min(self.default_max_tokens, room)
        if len(ids) + max_tokens > self.engine.context:
            raise APIError(400, f"This model's maximum context length is {self.engine.context} tokens; the prompt has "
                           f"{len(ids)} tokens and max_tokens is {max_tokens}", param="max_tokens",
                           code="context_length_exceeded")
        return Request(ids=ids, max_tokens=max_tokens, temperature=fields["temperature"], top_p=fields["top_p"],
                       seed=fields["seed"], stop=fields["stop"] + extra_stops)

    async def run(self, request: Request, on_delta: Optional[Callable[[str], Any]] = None) -> str:
        """Submit and wait for the request, giving each piece of text to `on_delta`; cancelled if the caller is."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        request.on_text = lambda text, finish: loop.call_soon_threadsafe(pieces.put_nowait, (text, finish))
        try:
            self.engine.submit(request)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        except UserError as e:
            raise APIError(400, str(e))
        text = []
        try:
            while True:
                delta, finish = await pieces.get()
                if delta:
                    text.append(delta)
                    if on_delta is not None:
                        await on_delta(delta)
                if finish == "error":
                    raise APIError(500, "the server failed on this request; its log says why", type="server_error")
                if finish is not None:
                    return "".join(text)
        except BaseException:
            self.engine.cancel(request)  # the client went away (or the server stops): free the slot
            raise


def finish_reason(request: Request) -> str:
    return "length" if request.completion.finish_reason == "length" else "stop"


def usage(request: Request) -> dict:
    prompt, completion = len(request.ids), request.generated
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def make_app(service: Service, api_key: Optional[str] = None, lifespan: Optional[Callable] = None):
    """The FastAPI application (`lifespan`: FastAPI's startup/shutdown context, where the engine starts and stops)."""
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="lit-phi", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.middleware("http")
    async def authenticate(request: HTTPRequest, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                error = APIError(401, "Incorrect or missing API key", type="authentication_error",
                                 code="invalid_api_key")
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        engine = service.engine
        return {"status": "ok", "busy": engine.busy(), "finished": engine.finished, "cancelled": engine.cancelled}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(service.model_id)]}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await _json_body(request, service)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be a string", param="prompt")
        job = service.request(prompt, sampling_fields(body))
        answer = _Answer(service, job, "text_completion", body.get("model"))
        return await _respond(answer, body, StreamingResponse)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await _json_body(request, service)
        try:
            prompt = service.render_chat(_messages(body))
        except UserError as e:
            raise APIError(400, str(e), param="messages")
        job = service.request(prompt, sampling_fields(body), service.chat_stops)
        answer = _Answer(service, job, "chat.completion", body.get("model"))
        return await _respond(answer, body, StreamingResponse)

    return app


def _model_card(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "lit-phi"}


async def _json_body(request, service: Service) -> dict:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON ({e})")
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError(400, "'model' is required and must be a string", param="model")
    if model != service.model_id:
        raise APIError(404, f"The model '{model}' does not exist; this server has '{service.model_id}'",
                       param="model", code="model_not_found")
    return body


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    for m in messages:
        if (not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer")
                or not isinstance(m.get("content"), str)):
            raise APIError(400, "each message needs a 'role' (system, user, assistant) and a string 'content'",
                           param="messages")
    return messages


class _Answer:
    """One request's answer in OpenAI's shapes, whole or as chunks."""

    def __init__(self, service: Service, request: Request, object: str, model: str) -> None:
        self.service, self.request, self.object, self.model = service, request, object, model
        self.id = ("chatcmpl-" if object == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.chat = object == "chat.completion"

    def whole(self, text: str) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": finish_reason(self.request)}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(self.request)}
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage(self.request)}

    def chunk(self, delta: Optional[str], finish: Optional[str] = None, role: bool = False) -> str:
        if self.chat:
            content = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}
            object = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            object = "text_completion"
        data = {"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice]}
        return f"data: {json.dumps(data)}\n\n"

    def usage_chunk(self) -> str:
        data = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": usage(self.request)}
        return f"data: {json.dumps(data)}\n\n"


async def _respond(answer: _Answer, body: dict, streaming_response):
    if not body.get("stream"):
        return answer.whole(await answer.service.run(answer.request))
    options = body.get("stream_options") or {}
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    # submit now, so that a full queue is a 429 and not a broken stream
    pieces: asyncio.Queue = asyncio.Queue()

    async def put(delta: str) -> None:
        await pieces.put(delta)

    task = asyncio.ensure_future(answer.service.run(answer.request, put))
    await asyncio.sleep(0)
    if task.done() and task.exception() is not None:
        raise task.exception()

    async def events():
        try:
            if answer.chat:
                yield answer.chunk(None, role=True)
            while not (task.done() and pieces.empty()):
                getter = asyncio.ensure_future(pieces.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield answer.chunk(getter.result())
                else:
                    getter.cancel()
            task.result()
            yield answer.chunk(None, finish_reason(answer.request))
            if include_usage:
                yield answer.usage_chunk()
            yield "data: [DONE]\n\n"
        finally:
            if not task.done():
                task.cancel()  # the client disconnected: Service.run cancels the request

    return streaming_response(events(), media_type="text/event-stream")
