"""Sampling over the KV cache, shared by generate/base.py and chat/base.py.

Layers, bottom up (each is usable on its own):
- `sample`: one token per row of logits (greedy, temperature, top-k, top-p).
- `generate_tokens`: the loop. Prefill the prompt once, then one forward of one token per step. Yields ids.
- `Completion`: one sample's text as it streams, with eos, stop tokens and stop sequences cut and never released.
- `stream` / `generate`: the loop plus a `Completion` per sample (several samples = one batch).
- `ChatSession`: a conversation kept in the KV cache; each turn prefills only its own tokens.
Plus the seeded generator and the compiled decode step.

Stop sequences are matched on text, not on token ids: the model can spell "Instruct:" with many different
token splits ("Inst"+"ruct"+":", " Instruct"+":", "\\nInstruct"...), and the split the tokenizer would
produce for the stop string is only one of them, so id matching misses stops. Text matching sees them all;
its cost is holding back text that could still become a stop sequence (at most the longest stop's length).
A stop sequence that is a special token of the tokenizer ("<|end|>", "<|im_end|>") also stops as an id, as does
every eos id of generation_config.json.
"""

import sys
import time
from typing import Callable, Collection, Iterator, Optional, Sequence, Union

import torch

from lit_gpt import gemv
from lit_gpt.model import GPT
from lit_gpt.prompts import ChatTemplate, Style
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import InvalidArgument, UserError

PREFILL_CHUNK = 512  # prompt tokens per prefill forward: bounds the (B, chunk, vocab) logits of a long prompt


def check_sampling(temperature: float, top_k: Optional[int], top_p: float) -> None:
    if not temperature >= 0:  # also catches NaN
        raise InvalidArgument("temperature", f"must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise InvalidArgument("top_k", f"must be >= 1 (or unset), got {top_k}")
    if not 0 < top_p <= 1:
        raise InvalidArgument("top_p", f"must be in (0, 1] (1 = off), got {top_p}")


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Draw one token id per row of `logits` (..., vocab) -> (...) int64.

    temperature 0 is greedy (argmax). Otherwise the logits are divided by the temperature, cut to the
    `top_k` largest, turned into probabilities, and cut to the smallest set of most likely tokens whose
    mass reaches `top_p` (the order of transformers' warpers); the draw is from what is left, renormalised.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if top_k is not None and top_k < logits.size(-1):
        # work on the k largest only (sorted, so top-p needs no sort): O(k) instead of O(vocab) per step
        logits, index = torch.topk(logits, top_k, dim=-1)
    else:
        index = None
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        if index is None:
            probs, index = torch.sort(probs, dim=-1, descending=True)
        # drop a token when the more likely ones already reach top_p (the most likely one always stays)
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    # argmax(p / E) with E ~ Exp(1) picks index i with probability p_i / sum(p): a draw from the
    # renormalised distribution without a host sync (unlike torch.multinomial on CUDA), compile-friendly.
    # E = -log(U) is 4x faster than Tensor.exponential_ on the CPU; U == 0 gives E = inf, p / E = 0.
    e = torch.rand(probs.shape, device=probs.device, generator=generator).log_().neg_()
    choice = (probs / e).argmax(dim=-1)
    return choice if index is None else index.gather(-1, choice.unsqueeze(-1)).squeeze(-1)


def _ensure_kv_cache(model: GPT, batch_size: int, length: int, start_pos: int) -> None:
    cache = model.transformer.h[0].attn.kv_cache
    if cache is not None and cache.k.size(0) == batch_size and model.max_seq_length >= length:
        return
    if start_pos:
        raise ValueError(f"start_pos={start_pos} continues a KV cache that does not hold batch {batch_size} "
                         f"and {length} positions; set it with model.set_kv_cache first")
    model.set_kv_cache(batch_size, max_seq_length=length)


def check_context(block: int, prompt_len: int, max_returned_tokens: int, start_pos: int = 0) -> None:
    """UserError unless start_pos + max_returned_tokens (prompt + new tokens) fit a context of `block` tokens."""
    prompt_len += start_pos
    if prompt_len >= block:
        raise UserError(f"the prompt is {prompt_len} tokens, longer than the model's context of {block} tokens "
                        "(which must also hold at least one new token); shorten it")
    if start_pos + max_returned_tokens > block:
        new = start_pos + max_returned_tokens - prompt_len
        raise InvalidArgument("max_new_tokens", f"is too large: the prompt ({prompt_len} tokens) + {new} new tokens "
                              f"exceed the model's context of {block} tokens; use {{name}} {block - prompt_len} or less")


@torch.inference_mode()
def generate_tokens(
    model: GPT,
    prompt: torch.Tensor,
    max_returned_tokens: int,
    *,
    start_pos: int = 0,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    decode_forward: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
) -> Iterator[torch.Tensor]:
    """Yield one (B,) tensor of sampled ids per step, up to `max_returned_tokens - T` steps. No stop logic.

    `prompt` is (T,) or (B, T); each row is a sequence (B copies of one prompt = B samples). It is written
    to the KV cache at positions start_pos.. (start_pos > 0 continues a conversation already in the cache).
    A yielded token enters the cache on the *next* step, so when the caller stops after receiving n >= 1
    tokens, positions < start_pos + T + n - 1 hold valid keys/values (fewer if stopped during the prefill).
    `decode_forward` replaces the model's forward for the one-token steps (e.g. a torch.compile'd model).
    """
    check_sampling(temperature, top_k, top_p)
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0)
    B, T = prompt.shape
    if T == 0:
        raise UserError("the prompt is empty; generation needs at least one token to start from")
    check_context(model.config.block_size, T, max_returned_tokens, start_pos)
    _ensure_kv_cache(model, B, start_pos + max_returned_tokens, start_pos)
    device = prompt.device

    # prefill, in chunks (a long prompt's activations stay bounded), each giving only its last position's logits
    for begin in range(0, T, PREFILL_CHUNK):
        chunk = prompt[:, begin:begin + PREFILL_CHUNK]
        pos = torch.arange(start_pos + begin, start_pos + begin + chunk.size(1), device=device)
        logits = model(chunk, pos, last_only=True)
    token = sample(logits[:, -1], temperature, top_k, top_p, generator)
    yield token

    forward = model if decode_forward is None else decode_forward
    input_pos = torch.tensor([start_pos + T], device=device)  # one tensor for every step, advanced in place
    for _ in range(max_returned_tokens - T - 1):
        logits = forward(token.view(B, 1), input_pos)
        token = sample(logits[:, -1], temperature, top_k, top_p, generator)
        yield token
        input_pos.add_(1)


class Completion:
    """One sample's output while it streams: its ids, the text released so far, and why it ended.

    Text that could still be the start of a stop sequence is held back until the next token settles it,
    so a stop sequence is never released, however many tokens it spans. Text is decoded through the
    tokenizer's stream decoder, so a character split over several tokens (emoji, CJK) comes out whole.
    """

    def __init__(self, tokenizer: Tokenizer, stop_sequences: Sequence[str] = (),
                 eos_id: Union[None, int, Collection[int]] = None, stop_ids: Collection[int] = ()) -> None:
        self.ids: list[int] = []  # every id sampled for this sample (an eos or a stop sequence's ids included)
        self.text = ""  # text released so far; never contains a stop sequence
        self.delta = ""  # text released by the latest add() / finish()
        self.finish_reason: Optional[str] = None  # "eos", "stop", "length"; None while running
        self.eos_ids = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())  # finish as "eos"
        self.stop_ids = set(stop_ids) - self.eos_ids  # end-of-turn tokens: finish as "stop"
        self._decoder = tokenizer.stream_decoder()
        self._pending = ""  # decoded text not released yet
        self._stops = tuple(s for s in stop_sequences if s)
        self._prefixes = {s[:k] for s in self._stops for k in range(1, len(s))}
        self._longest_prefix = max((len(s) - 1 for s in self._stops), default=0)

    def add(self, token_id: int) -> str:
        """Take the next sampled id; return the text it releases ("" if held back or already finished)."""
        if self.finish_reason is not None:
            self.delta = ""
            return ""
        self.ids.append(token_id)
        if token_id in self.eos_ids or token_id in self.stop_ids:  # the token itself is never decoded
            self._pending += self._decoder.flush()
            return self._release("eos" if token_id in self.eos_ids else "stop")
        self._pending += self._decoder.add(token_id)
        return self._release(None)

    def finish(self, reason: str = "length") -> str:
        """End a sample that did not stop by itself; return the held-back text (it was no stop sequence)."""
        if self.finish_reason is not None:
            self.delta = ""
            return ""
        self._pending += self._decoder.flush()
        return self._release(reason)

    def _release(self, final: Optional[str]) -> str:
        pending = self._pending
        hits = [i for i in (pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            out, self._pending, final = pending[:min(hits)], "", "stop"
        elif final:
            out, self._pending = pending, ""
        else:
            # hold back the longest tail that a stop sequence starts with
            keep = 0
            for k in range(min(self._longest_prefix, len(pending)), 0, -1):
                if pending[-k:] in self._prefixes:
                    keep = k
                    break
            out, self._pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
        if final:
            self.finish_reason = final
        self.text += out
        self.delta = out
        return out


def stream(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: torch.Tensor,
    max_returned_tokens: int,
    *,
    num_samples: int = 1,
    stop_sequences: Sequence[str] = (),
    ignore_eos: bool = False,
    start_pos: int = 0,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    decode_forward: Optional[Callable] = None,
) -> Iterator[list[Completion]]:
    """Generate `num_samples` continuations of the 1-D `prompt` as one batch, yielding after every step.

    Each yield is the same list of `Completion`s, one per sample; `c.delta` is the text sample c released
    in that step. Samples stop on their own (eos, a stop sequence); the batch runs until all have stopped
    or `max_returned_tokens` (prompt + new tokens) is reached, then the last yield holds any final text.
    Every eos id of the tokenizer (generation_config.json's list) ends a sample, unless `ignore_eos`.
    """
    if prompt.dim() != 1:
        raise ValueError("stream() takes one 1-D prompt; num_samples makes the batch")
    if num_samples < 1:
        raise InvalidArgument("num_samples", f"must be >= 1, got {num_samples}")
    eos_ids = () if ignore_eos else tokenizer.eos_ids
    stop_ids = tokenizer.special_ids(stop_sequences)  # "<|end|>" as text and as its id
    completions = [Completion(tokenizer, stop_sequences, eos_ids, stop_ids) for _ in range(num_samples)]
    batch = prompt.unsqueeze(0).expand(num_samples, -1)
    for tokens in generate_tokens(model, batch, max_returned_tokens, start_pos=start_pos, temperature=temperature,
                                  top_k=top_k, top_p=top_p, generator=generator, decode_forward=decode_forward):
        for c, t in zip(completions, tokens.tolist()):
            c.add(t)
        yield completions
        if all(c.finish_reason is not None for c in completions):
            return
    for c in completions:
        c.finish("length")
    yield completions


def generate(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: torch.Tensor,
    max_returned_tokens: int,
    **kwargs,
) -> list[Completion]:
    """`stream` run to the end: the finished `Completion` of each sample (same keyword arguments)."""
    completions: list[Completion] = []
    for completions in stream(model, tokenizer, prompt, max_returned_tokens, **kwargs):
        pass
    return completions


class ChatSession:
    """A multi-turn conversation held in the model's KV cache (batch 1).

    `self.ids` is the conversation as tokens (every turn's framed prompt and reply); the first `self.cached`
    of them have their keys/values in the cache. A new turn prefills only ids[cached:]. Positions beyond `cached`
    may hold stale entries (a cut stop sequence, an interrupted forward); they are never attended to and get
    overwritten.

    With a `PromptStyle` a turn's ids are its own framed prompt, appended to the history: it prefills those and the
    last reply token (sampled, but not fed yet). With a `ChatTemplate` the whole conversation is rendered again
    (as transformers would, with the generation prompt) and tokenized: what the cache holds is kept as far as the
    new ids continue it, and only the rest is prefilled; that is the new turn (and the reply's end-of-turn token)
    when the template renders earlier turns as they were, more from the first difference on otherwise.

    `system` is a system prompt: the template's system message, or the text before the first turn of a style. A
    reply that is interrupted (KeyboardInterrupt, or the caller closing the generator) keeps what was released so
    far in the history, as the user saw it. When the context fills up, the oldest turns are dropped (the system
    prompt stays) and what remains is encoded and prefilled again.
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        style: Style,
        *,
        system: Optional[str] = None,
        max_new_tokens: int = 512,
        temperature: float = 0.8,
        top_k: Optional[int] = 200,
        top_p: float = 1.0,
        generator: Optional[torch.Generator] = None,
        decode_forward: Optional[Callable] = None,
        notify: Optional[Callable[[str], None]] = None,
    ) -> None:
        check_sampling(temperature, top_k, top_p)
        if max_new_tokens < 1:
            raise InvalidArgument("max_new_tokens", f"must be >= 1, got {max_new_tokens}")
        self.model, self.tokenizer, self.style, self.system = model, tokenizer, style, system or None
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                             decode_forward=decode_forward)
        self.max_new_tokens = max_new_tokens
        self.notify = notify or (lambda msg: print(msg, file=sys.stderr, flush=True))
        if model.transformer.h[0].attn.kv_cache is None or model.transformer.h[0].attn.kv_cache.k.size(0) != 1:
            model.set_kv_cache(1)
        self.context = min(model.max_seq_length, model.config.block_size)
        self.device = model.lm_head.weight.device
        self.stats = {"tokens": 0, "prefill_tokens": 0, "seconds": 0.0, "first_token_seconds": 0.0}
        if self.system and isinstance(style, ChatTemplate) and style.conversation([("?", None)], self.system) == \
                style.conversation([("?", None)]):
            self.notify(f"[the chat template ({style.name}) has no place for a system prompt: it is left out]")
        self.reset()

    def reset(self) -> None:
        """Start a fresh conversation (the cache is simply overwritten from position 0)."""
        self.turns: list[tuple[str, str]] = []  # finished (prompt, reply) pairs
        self.ids: list[int] = []
        self.cached = 0
        self.reply_start = 0

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).tolist()

    def reply(self, prompt: str) -> Iterator[str]:
        """Stream the reply to `prompt` as text chunks; the turn joins the history however it ends.

        Raises UserError (before anything changes) if the prompt alone does not fit the context.
        """
        alone = self._encode(self.style.conversation([(prompt, None)], self.system))
        if len(alone) >= self.context:
            raise UserError(f"the prompt is {len(alone)} tokens but the context holds {self.context} tokens "
                            "including the reply; shorten it")
        start = self._rerender(prompt) if isinstance(self.style, ChatTemplate) else self._append_turn(prompt, alone)
        self.reply_start = len(self.ids)  # where this turn's reply begins in self.ids
        feed = torch.tensor(self.ids[start:], dtype=torch.int64, device=self.device)
        budget = min(self.max_new_tokens, self.context - len(self.ids))
        completion: Optional[Completion] = None
        t0 = time.perf_counter()
        try:
            for completions in stream(self.model, self.tokenizer, feed, len(feed) + budget, start_pos=start,
                                      stop_sequences=self.style.stop_sequences, **self.sampling):
                if completion is None:
                    completion = completions[0]
                    self.stats["first_token_seconds"] = time.perf_counter() - t0
                if completion.delta:
                    yield completion.delta
        finally:
            self.stats.update(tokens=len(completion.ids) if completion else 0, prefill_tokens=len(feed),
                              seconds=time.perf_counter() - t0)
            self._commit(prompt, completion, start, len(feed))

    def _want(self) -> int:
        """Room a reply gets before older turns are dropped: max_new_tokens, or half the context."""
        return min(self.max_new_tokens, self.context // 2)

    def _append_turn(self, prompt: str, alone: list[int]) -> int:
        """A style's turn: its framed prompt joins the history. Returns the position the prefill starts at."""
        assert not isinstance(self.style, ChatTemplate)
        turn = self._encode(self.style.next_turn(prompt)) if self.turns else alone
        dropped = 0
        while self.turns and len(self.ids) + len(turn) + self._want() > self.context:
            self.turns.pop(0)
            dropped += 1
            self.ids = self._encode(self.style.conversation(self.turns, self.system)) if self.turns else []
            self.cached = 0
            turn = self._encode(self.style.next_turn(prompt)) if self.turns else alone
        self._dropped(dropped)
        start = self.cached
        self.ids += turn
        return start

    def _rerender(self, prompt: str) -> int:
        """A template's turn: the conversation rendered again. Returns the position the prefill starts at: where
        the new ids stop continuing what the cache holds (never past the last id, which starts the reply)."""
        turns: list[tuple[str, Optional[str]]] = [*self.turns, (prompt, None)]
        ids = self._encode(self.style.conversation(turns, self.system))
        while len(turns) > 1 and len(ids) + self._want() > self.context:
            turns.pop(0)
            ids = self._encode(self.style.conversation(turns, self.system))
        self._dropped(len(self.turns) + 1 - len(turns))
        self.turns = turns[:-1]  # type: ignore[assignment]
        same = 0
        for cached, new in zip(self.ids[:self.cached], ids):
            if cached != new:
                break
            same += 1
        self.ids, self.cached = ids, min(same, len(ids) - 1)
        return self.cached

    def _dropped(self, n: int) -> None:
        if n:
            self.notify(f"[context full: dropped the oldest {n} turn(s); re-encoding the {len(self.turns)} left]")

    def _commit(self, prompt: str, completion: Optional[Completion], start: int, fed: int) -> None:
        """Add the finished (or interrupted) reply to the history and work out how much of the cache is valid."""
        n = len(completion.ids) if completion else 0
        text = completion.text.rstrip() if completion else ""
        ids = completion.ids if completion else []
        # keep the longest run of sampled ids that spells a prefix of the kept text (drops a stop sequence's
        # ids and an eos); whatever text is left of a partly kept token is encoded
        m = len(ids)
        while m and not text.startswith(self.tokenizer.decode(ids[:m])):
            m -= 1
        kept_text = self.tokenizer.decode(ids[:m]) if m else ""
        before = len(self.ids)
        self.ids += ids[:m]
        if len(kept_text) < len(text):
            self.ids += self._encode(text[len(kept_text):])
        # the cache holds the prefill and the first n - 1 sampled ids (none are sure if stopped in the prefill)
        valid = start + fed + n - 1 if n else start
        self.cached = min(valid, before + m)
        self.turns.append((prompt, completion.text if completion else ""))


def make_generator(device: torch.device, seed: Optional[int]) -> torch.Generator:
    """A generator for sampling on `device`: seeded (reproducible runs) or, with seed None, from OS entropy."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def compile_decode(model: GPT) -> Callable:
    """The model's forward compiled for the one-token decode steps (static shapes).

    GPU: CUDA graphs ("reduce-overhead"), which remove the per-kernel launch cost of a step.
    CPU with our kernels (lit_gpt/gemv.py): inductor's default mode. Where the blocks take the one-call
    step (GPT.fused_decode), that call runs as in eager mode, a graph break between the compiled
    embedding and head; elsewhere the matrix-vector products and the attention stay our kernels (custom
    ops) and inductor fuses the small ops between them, rounding to bf16 where eager PyTorch does
    (emulate_precision_casts). Either way the logits are eager's, bit for bit, so greedy decoding gives
    the same tokens even where two logits tie.
    CPU without them: "max-autotune" with inductor's freezing, which lets inductor pack the weights
    for its own C++ GEMM kernels: faster than PyTorch's eager kernels (phi-2 bf16 on this project's
    2-core AMD EPYC: 1.9 -> 5.4 tokens/s), at the cost of minutes of compilation and a packed copy
    of the weights in memory.
    """
    if model.lm_head.weight.device.type == "cuda":
        return torch.compile(model, mode="reduce-overhead", fullgraph=True, dynamic=False)
    import torch._inductor.config as inductor_config

    if gemv.available():  # loads the kernels now: torch.compile does not trace their loading
        # not fullgraph: GPT.fused_decode's one call is a graph break
        compiled, options = torch.compile(model, dynamic=False), {"emulate_precision_casts": True}
    else:
        # freezing: the weights are constants of the graph, packed once when it compiles
        compiled, options = torch.compile(model, mode="max-autotune", fullgraph=True, dynamic=False), {"freezing": True}

    def forward(idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        # inductor reads these when it compiles (on the first call); set here rather than globally, so
        # other compilations in the process are unaffected
        with inductor_config.patch(**options):
            return compiled(idx, input_pos)

    return forward
