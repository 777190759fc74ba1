"""Continuous batching: many requests share each decode step, joining and leaving the batch as they come and go.

On a CPU (and at small batches on a GPU) a decode step is bound by reading the weights, so a step for 8 rows
costs little more than a step for one. The `Engine` owns the model and a KV cache of `max_batch_size` rows
(slots), and runs one loop in a thread of its own:

1. waiting requests take free slots (up to `max_queue` wait; more are refused with `QueueFull`);
2. a request that has a slot but no cache yet gets its prompt prefilled, one chunk of `prefill_chunk` tokens
   per loop turn, so that the rows already decoding keep streaming between the chunks;
3. one decode step for every slot at once, each row at its own position in the cache; every row samples
   with its own settings and generator, and a finished (or cancelled) row frees its slot at once.

A decode step runs the cache rows from the first to the last busy one (idle rows among them on a dummy
token). A row's numbers do not depend on what the other rows hold; the batch's size changes which matrix
kernel runs (one row: the decode kernels of lit_gpt/gemv.py), which moves float32 logits by ~1e-6 and
bf16 ones by their last bit.
"""

import itertools
import traceback
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from lit_gpt.config import Config
from lit_gpt.generate import Completion, make_generator, sample
from lit_gpt.model import GPT
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import InvalidArgument, UserError


class QueueFull(UserError):
    """All slots are busy and the queue is full: the client should retry later."""


@dataclass
class Request:
    """One generation: the prompt's ids, how to sample, and where its text goes."""

    ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    # called from the engine's thread with (text released now, finish reason or None); the reason "error" means
    # the engine failed on it (the traceback went to stderr)
    on_text: Callable[[str, Optional[str]], None] = lambda text, finish: None
    id: int = field(default_factory=itertools.count().__next__)
    completion: Optional[Completion] = None
    cancelled: bool = False

    @property
    def generated(self) -> int:
        """Tokens sampled so far (an eos that ended the request is not counted)."""
        if self.completion is None:
            return 0
        n = len(self.completion.ids)
        return n - 1 if self.completion.finish_reason == "eos" else n


@dataclass
class _Slot:
    request: Request
    generator: torch.Generator
    fed: int = 0  # prompt tokens in the cache
    token: int = 0  # the last sampled token: the next step's input
    position: int = 0  # where `token` goes in the cache


def serving_context(config: Config, max_seq_length: Optional[int] = None) -> int:
    """Tokens per request (prompt included) that a server's cache rows hold: `max_seq_length`, by default the model's
    context. A longrope model is served up to original_max_position_embeddings: past it the cached keys of a
    sequence are computed again with the long factors (GPT._sync_rope), which is one row's business while the
    factors are the whole cache's."""
    limit = config.rope_original_max_seq_len if config.longrope else config.block_size
    if max_seq_length is None:
        return min(limit, config.block_size)
    if max_seq_length < 2:
        raise InvalidArgument("max_seq_length", f"must be >= 2, got {max_seq_length}")
    if max_seq_length > limit:
        why = " (a longrope model is served up to its original_max_position_embeddings)" if config.longrope else ""
        raise InvalidArgument("max_seq_length", f"is {max_seq_length}, beyond the {limit} tokens this model can be "
                                                f"served with{why}")
    return max_seq_length


class Engine:
    def __init__(self, model: GPT, tokenizer: Tokenizer, max_batch_size: int = 8, max_seq_length: Optional[int] = None,
                 max_queue: int = 64, prefill_chunk: int = 128, decode_forward: Optional[Callable] = None) -> None:
        """`decode_forward`: what runs the decode steps (a compiled model, generate.compile_decode), else the model."""
        self.model, self.tokenizer = model, tokenizer
        self.decode_forward = decode_forward or model
        self.device = model.lm_head.weight.device
        self.max_batch_size, self.max_queue, self.prefill_chunk = max_batch_size, max_queue, prefill_chunk
        self.context = serving_context(model.config, max_seq_length)
        model.set_kv_cache(max_batch_size, max_seq_length=self.context)
        self.slots: list[Optional[_Slot]] = [None] * max_batch_size
        self.waiting: "queue.Queue[Request]" = queue.Queue()
        self.wake = threading.Event()
        self.stopping = False
        self.finished = self.cancelled = 0  # requests served to the end; dropped unfinished (clients gone)
        self.thread = threading.Thread(target=self._run, name="lit-gpt-engine", daemon=True)

    # ---- the caller's side (any thread)

    def submit(self, request: Request) -> None:
        """Queue a request; QueueFull when every slot is busy and `max_queue` requests already wait."""
        if len(request.ids) + request.max_tokens > self.context:
            raise UserError(f"the prompt ({len(request.ids)} tokens) + max_tokens ({request.max_tokens}) exceed the "
                            f"context of {self.context} tokens")
        if not request.ids:
            raise UserError("the prompt is empty")
        if self.busy() >= self.max_batch_size + self.max_queue:  # (requests not yet in a slot count as waiting)
            raise QueueFull(f"all {self.max_batch_size} slots are busy and {self.max_queue} requests wait")
        self.waiting.put(request)
        self.wake.set()

    def cancel(self, request: Request) -> None:
        """Stop a request (its client went away): its slot is freed at the next loop turn."""
        request.cancelled = True
        self.wake.set()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join()

    def busy(self) -> int:
        """Requests in slots or waiting for one."""
        return sum(s is not None for s in self.slots) + self.waiting.qsize()

    # ---- the engine's thread

    @torch.inference_mode()
    def _run(self) -> None:
        while not self.stopping:
            try:
                self._turn()
            except Exception:  # a bug or out of memory: fail what is in flight, say why, and keep serving
                traceback.print_exc()
                self._fail_all()

    def _turn(self) -> None:
        """One turn of the loop: drop cancelled requests, admit waiting ones, one prefill chunk, one decode step."""
        self._drop_cancelled()
        self._admit()
        prefilling = [i for i, s in enumerate(self.slots) if s is not None and s.fed < len(s.request.ids)]
        decoding = [i for i, s in enumerate(self.slots) if s is not None and s.fed == len(s.request.ids)]
        if prefilling:
            self._prefill_chunk(prefilling[0])
        if decoding:
            self._decode_step(decoding)
        if not prefilling and not decoding:
            self.wake.wait(timeout=0.1)
            self.wake.clear()

    def _fail_all(self) -> None:
        for i, slot in enumerate(self.slots):
            if slot is not None:
                self.slots[i] = None
                slot.request.on_text("", "error")
        while not self.waiting.empty():
            self.waiting.get_nowait().on_text("", "error")

    def _drop_cancelled(self) -> None:
        for i, slot in enumerate(self.slots):
            if slot is not None and slot.request.cancelled:
                self.slots[i] = None
                self.cancelled += 1

    def _admit(self) -> None:
        for i in range(self.max_batch_size):
            if self.slots[i] is not None:
                continue
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                return
            if request.cancelled:
                self.cancelled += 1
                continue
            stop_ids = self.tokenizer.special_ids(request.stop)  # "<|end|>" as text and as its id
            request.completion = Completion(self.tokenizer, request.stop, self.tokenizer.eos_ids, stop_ids)
            self.slots[i] = _Slot(request, make_generator(self.device, request.seed))

    def _prefill_chunk(self, i: int) -> None:
        """The next chunk of slot i's prompt into its cache row; after the last one, its first token."""
        slot = self.slots[i]
        ids = slot.request.ids
        chunk = ids[slot.fed:slot.fed + self.prefill_chunk]
        idx = torch.tensor([chunk], device=self.device)
        pos = torch.arange(slot.fed, slot.fed + len(chunk), device=self.device)
        logits = self.model(idx, pos, row=i, last_only=True)
        slot.fed += len(chunk)
        if slot.fed == len(ids):
            slot.position = len(ids)
            self._take(i, self._sample(slot, logits[0, -1]))

    def _decode_step(self, rows: list[int]) -> None:
        """One step for the cache rows 0 .. the last decoding one, each row at its own position (slots are taken
        lowest first, so these are mostly the busy ones; one request alone decodes as a batch of one).

        A row in that range that is not decoding runs on a dummy token, written where it overwrites nothing: an
        empty row at 0, a row whose prompt is being prefilled at the first position its next chunk writes."""
        n = max(rows) + 1
        tokens = torch.zeros(n, 1, dtype=torch.int64, device=self.device)
        positions = torch.zeros(n, 1, dtype=torch.int64, device=self.device)
        for i, slot in enumerate(self.slots[:n]):
            if i in rows:
                tokens[i, 0], positions[i, 0] = slot.token, slot.position
            elif slot is not None:
                positions[i, 0] = slot.fed
        if n == 1:  # one row: its cache row alone, through the one-row attention kernel
            logits = self.model(tokens, positions[0], row=0)
        else:
            logits = self.decode_forward(tokens, positions)
        for i in rows:
            slot = self.slots[i]
            slot.position += 1
            self._take(i, self._sample(slot, logits[i, -1]))

    def _sample(self, slot: _Slot, logits: torch.Tensor) -> int:
        r = slot.request
        return int(sample(logits[None], r.temperature, r.top_k, r.top_p, slot.generator)[0])

    def _take(self, i: int, token: int) -> None:
        """Give slot i's request its new token; free the slot when the request is done."""
        slot = self.slots[i]
        r = slot.request
        slot.token = token
        text = r.completion.add(token)
        if r.completion.finish_reason is None and r.generated >= r.max_tokens:
            text += r.completion.finish("length")
        r.on_text(text, r.completion.finish_reason)
        if r.completion.finish_reason is not None:
            self.slots[i] = None
            self.finished += 1
