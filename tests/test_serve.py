"""serve/base.py against the official openai client: the answers generate gives, continuous batching that changes
no one's text, OpenAI's error shapes, disconnects and SIGTERM. The server runs the demo model on 127.0.0.1."""

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "phi-stdlib"
MODEL = "phi-stdlib"
KEY = "sk-test"
PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef read_file(path):", "class Stack:\n    def __init__(self):",
           "def is_prime(n):", "# utilities\nimport re\n", "def merge_sort(items):\n    \"\"\"Sort the items.\"\"\"",
           "x = 1\ny = 2\n", "for i in range(10):"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, *args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve" / "base.py"), "--checkpoint_dir", str(checkpoint),
                             "--port", str(port), "--precision", "32-true", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("serve") / MODEL
    shutil_copy(DEMO, d)
    return d


def shutil_copy(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lit_*"))


@pytest.fixture(scope="module")
def server(checkpoint):
    proc, url = start_server(checkpoint, "--max_batch_size", 8, "--max_queue", 16, "--api_key", KEY)
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def generate_text(checkpoint: Path, prompt: str, max_new_tokens: int) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "generate" / "base.py"), "--checkpoint_dir", str(checkpoint),
                           "--prompt", prompt, "--escapes", "False", "--temperature", "0", "--precision", "32-true",
                           "--max_new_tokens", str(max_new_tokens)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(prompt)
    return proc.stdout[len(prompt):-1]  # generate prints the prompt and a final newline


def test_models_and_health(client, server):
    import httpx2 as httpx

    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_completion_streaming_and_not_equal_generate(client, checkpoint):
    expected = generate_text(checkpoint, PROMPTS[0], 24)
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 24 and whole.usage.total_tokens == whole.usage.prompt_tokens + 24
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24


def test_chat_completion_streaming_and_not(client):
    messages = [{"role": "user", "content": "def add(a, b):"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    text = whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant" and text
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_stop_sequences_are_honoured_and_never_sent(client):
    free = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=30, temperature=0).choices[0].text
    stop = free[8:12]  # four characters from the middle of the greedy text
    cut = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == free[:free.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == free[:free.index(stop)]


def test_sixteen_concurrent_streams_each_get_their_text_alone(client):
    """16 clients (8 rows, the rest queued), different prompts and lengths, some arriving mid-stream."""
    jobs = [(PROMPTS[i % len(PROMPTS)], 8 + 3 * i) for i in range(16)]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0).choices[0].text
             for p, n in jobs]
    results: dict[int, str] = {}

    def stream(i: int) -> None:
        time.sleep(0.05 * i)  # arrive while others stream
        prompt, n = jobs[i]
        chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True)
        results[i] = "".join(c.choices[0].text for c in chunks if c.choices)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [results.get(i) for i in range(16)] == alone


def test_errors_have_openais_shape_and_status(client, server):
    import httpx2 as httpx
    from openai import AuthenticationError, BadRequestError, NotFoundError, OpenAI

    headers = {"Authorization": f"Bearer {KEY}"}
    bad_json = httpx.post(f"{server}/v1/completions", content=b"{not json", headers=headers)
    assert bad_json.status_code == 400 and set(bad_json.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(BadRequestError):
        client.completions.create(model=MODEL, prompt="x", temperature="hot")
    with pytest.raises(NotFoundError) as e:
        client.completions.create(model="gpt-5", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x " * 300, max_tokens=400)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    missing = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "x"})  # no key at all
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"


def test_a_full_queue_answers_429_with_retry_after(checkpoint):
    """One row, no queue: of 8 requests sent at once, one is served, the others are told to retry."""
    import asyncio

    import httpx2 as httpx

    proc, url = start_server(checkpoint, "--max_batch_size", 1, "--max_queue", 0)
    try:
        body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0}

        async def burst() -> list:
            async with httpx.AsyncClient(timeout=120) as http:
                await http.get(f"{url}/health")  # connected before the burst, so that the requests leave together
                return await asyncio.gather(*(http.post(f"{url}/v1/completions", json=body) for _ in range(8)))

        answers = asyncio.run(burst())
        codes = [a.status_code for a in answers]
        # one is served; those that arrive while it runs are refused (one that arrives after it may be served too)
        assert set(codes) == {200, 429} and codes.count(429) >= 4, codes
        refused = next(a for a in answers if a.status_code == 429)
        assert int(refused.headers["retry-after"]) >= 1 and refused.json()["error"]["type"] == "rate_limit_error"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_a_disconnect_frees_the_slot(checkpoint):
    import httpx2 as httpx

    proc, url = start_server(checkpoint, "--max_batch_size", 1, "--max_queue", 0)
    try:
        body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as first:
            next(first.iter_lines())
        # the client went away mid-stream: its request is dropped unfinished and the only row is free again
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").json()["busy"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"{url}/health").json() == {"status": "ok", "busy": 0, "finished": 0, "cancelled": 1}
        answer = httpx.post(f"{url}/v1/completions", json=dict(body, stream=False, max_tokens=4), timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4, answer.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_sigterm_with_requests_in_flight_exits_cleanly(checkpoint):
    import httpx2 as httpx

    proc, url = start_server(checkpoint, "--max_batch_size", 2, "--grace_period", 10)
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 40, "temperature": 0}
    answers = []
    thread = threading.Thread(target=lambda: answers.append(httpx.post(f"{url}/v1/completions", json=body,
                                                                       timeout=120)))
    thread.start()
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    thread.join(timeout=120)
    assert proc.wait(timeout=60) == 0
    assert "Traceback" not in proc.stderr.read()
    assert answers and answers[0].status_code == 200  # the request in flight finished
