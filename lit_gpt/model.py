"""The Phi model: a GPT with parallel attention + MLP blocks that read one shared LayerNorm.

Read top to bottom: GPT -> Block -> CausalSelfAttention / MLP -> rotary helpers -> KVCache.
"""

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_gpt import gemv
from lit_gpt.config import Config


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.lm_head = Linear(config.n_embd, config.padded_vocab_size, bias=config.lm_head_bias)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.norm_eps),
            )
        )
        self.max_seq_length = config.block_size
        self.reset_rope_cache()

    @property
    def max_seq_length(self) -> int:
        """How many positions the KV cache holds: the whole context unless set lower. Setting it, as lit-gpt's
        scripts do before `set_kv_cache(batch_size)`, sizes the caches that call allocates from then on (and drops
        a cache of another length); set_kv_cache's own `max_seq_length` sizes its one cache only."""
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self._check_length(value)
        if value != getattr(self, "_max_seq_length", value):
            self.clear_kv_cache()  # forward reads a cache as long as max_seq_length
        self._max_seq_length = self._default_cache_length = value

    def _check_length(self, length: int) -> None:
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"max_seq_length must be a positive integer, got {length!r}")
        if length > self.config.block_size:
            raise ValueError(f"max_seq_length {length} exceeds the model's context {self.config.block_size}")

    def reset_rope_cache(self, device: Optional[torch.device] = None) -> None:
        """(Re)compute the rotary tables; needed after building the model on the meta device."""
        device = device or self.lm_head.weight.device
        cos, sin = build_rope_cache(self.config.block_size, self.config.rope_n_elem, self.config.rope_base, device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def set_kv_cache(
        self,
        batch_size: int,
        max_seq_length: Optional[int] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Preallocate a key/value cache for `batch_size` sequences of up to `max_seq_length` tokens (default: what
        `model.max_seq_length` was set to, else the whole context)."""
        if max_seq_length is None:
            max_seq_length = self._default_cache_length
        self._check_length(max_seq_length)
        self._max_seq_length = max_seq_length
        device = device or self.lm_head.weight.device
        dtype = dtype or self.transformer.wte.weight.dtype
        # a causal mask over the whole cache, for the compiled path that keeps shapes static
        self.register_buffer(
            "causal_mask",
            torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=device).tril(),
            persistent=False,
        )
        c = self.config
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, c.n_query_groups, max_seq_length, c.head_size, device, dtype)

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def forward(self, idx: torch.Tensor, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits for token ids `idx` (B, T).

        Without `input_pos`: a plain causal forward over positions 0..T-1 (training, scoring).
        With `input_pos` (T positions): tokens are written into the KV cache at those positions and
        attend to everything cached before them (prefill of a prompt or of a new chat turn, decode).
        """
        T = idx.size(1)
        if input_pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds the model's context {self.config.block_size}")
            cos, sin = self.cos[:T], self.sin[:T]
            window = None
        else:
            cos, sin = self.cos[input_pos], self.sin[input_pos]
            window = self.attention_window(input_pos)

        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = block(x, cos, sin, input_pos, window)
        return self.lm_head(self.transformer.ln_f(x))

    def attention_window(self, input_pos: torch.Tensor) -> "Window":
        """The cache slots the queries at `input_pos` look at."""
        if torch.compiler.is_compiling():
            # static shapes: attend over the whole cache, masked (one graph for every step)
            return Window(self.max_seq_length, self.causal_mask[input_pos])
        # eager: read only the filled part of the cache (the positions are on the host for free on CPU;
        # on GPU this is one tiny sync per step)
        end = int(input_pos[-1]) + 1
        if input_pos.numel() == 1:
            return Window(end, None)
        return Window(end, self.causal_mask[input_pos, :end])


class Window(NamedTuple):
    """What a forward with `input_pos` attends to: cache positions 0 .. length - 1, through `mask` (T, length)
    (None: all of them, as for a single query at position length - 1)."""

    length: int
    mask: Optional[torch.Tensor]


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose one-row CPU products, i.e. decode steps,
    go through our AVX-512 kernel (lit_gpt/gemv.py) where the CPU and a C compiler allow, else through
    ATen's matrix-vector product (gemv.pytorch_fallback)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = gemv.linear_bf16(x, self.weight, self.bias)
        if y is None:
            with gemv.pytorch_fallback(x, one_row=x.numel() == self.in_features):
                y = F.linear(x, self.weight, self.bias)
        return y


class Block(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: Optional[torch.Tensor],
                window: Optional[Window]) -> torch.Tensor:
        h = self.norm_1(x)
        # parallel residual: attention and MLP both read the same normalized input
        return x + self.attn(h, cos, sin, input_pos, window) + self.mlp(h)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        # q, k and v fused in one matmul, laid out per query group: [q.. , k, v] for each group
        # (lit-gpt's layout, so lit-gpt checkpoints load as they are)
        qkv_size = (config.n_head + 2 * config.n_query_groups) * config.head_size
        self.attn = Linear(config.n_embd, qkv_size, bias=config.bias)
        self.proj = Linear(config.n_head * config.head_size, config.n_embd, bias=config.bias)
        self.config = config
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: Optional[torch.Tensor],
                window: Optional[Window]) -> torch.Tensor:
        B, T, _ = x.shape
        c = self.config
        scale = 1.0 / math.sqrt(c.head_size)
        qkv = self.attn(x)
        if input_pos is None:
            q, k, v = self.heads(qkv, cos, sin)
            y = self.attention(q, k, v, None, scale, causal=True)
        else:
            if self.kv_cache is None:
                raise RuntimeError("call model.set_kv_cache(batch_size) before decoding with input_pos")
            # an eager decode step on CPU: rotary embedding, cache write and attention in one kernel call
            y = self.kv_cache.fused_decode(qkv, cos, sin, window.length, c.n_head, c.rope_n_elem, scale)
            if y is not None:
                return self.proj(y)
            q, k, v = self.heads(qkv, cos, sin)
            k, v = self.kv_cache.update(input_pos, k, v)
            y = gemv.attend_one(q, k, v, input_pos, scale)  # a decode step on CPU (see gemv.c); needs no mask
            if y is None:
                y = self.attention(q, k[:, :, : window.length], v[:, :, : window.length], window.mask, scale)
        y = y.transpose(1, 2).reshape(B, T, c.n_head * c.head_size)
        return self.proj(y)

    def heads(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q (B, n_head, T, hs), k and v (B, n_query_groups, T, hs) from the fused qkv (B, T, ...); q and k rotated."""
        B, T, _ = qkv.shape
        c = self.config
        q_per_kv = c.n_head // c.n_query_groups
        qkv = qkv.view(B, T, c.n_query_groups, q_per_kv + 2, c.head_size)
        q, k, v = qkv.split((q_per_kv, 1, 1), dim=3)
        q = q.reshape(B, T, c.n_head, c.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.reshape(B, T, c.n_query_groups, c.head_size).transpose(1, 2)
        v = v.reshape(B, T, c.n_query_groups, c.head_size).transpose(1, 2)
        return apply_partial_rope(q, cos, sin, c.rope_n_elem), apply_partial_rope(k, cos, sin, c.rope_n_elem), v

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                  scale: float, causal: bool = False) -> torch.Tensor:
        """PyTorch's attention of q over k, v: causal (a forward without the cache), or through `mask` (None: all)."""
        gqa = self.config.n_head > self.config.n_query_groups
        with gemv.pytorch_fallback(q, one_row=q.size(0) * q.size(2) == 1):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


class MLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc = Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = Linear(config.intermediate_size, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


def build_rope_cache(seq_len: int, n_elem: int, base: int,
                     device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (seq_len, n_elem), float32, in the "rotate half" layout."""
    inv_freq = 1.0 / (base ** (torch.arange(0, n_elem, 2, device=device, dtype=torch.float32) / n_elem))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    freqs = torch.cat((freqs, freqs), dim=-1)
    return freqs.cos(), freqs.sin()


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_elem: int) -> torch.Tensor:
    """Rotate the first `n_elem` dims of each head (GPT-NeoX "rotate half"); the rest pass through."""
    rot, rest = x[..., :n_elem], x[..., n_elem:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = n_elem // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


class KVCache(nn.Module):
    """Preallocated keys and values, (B, n_query_groups, max_seq_length, head_size), written in place by its
    methods only."""

    def __init__(self, batch_size: int, n_groups: int, max_seq_length: int, head_size: int,
                 device: Optional[torch.device], dtype: Optional[torch.dtype]) -> None:
        super().__init__()
        shape = (batch_size, n_groups, max_seq_length, head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys and values (B, n_query_groups, T, head_size) at the T positions `input_pos`; return the
        whole cache."""
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v

    def fused_decode(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, length: int, n_head: int,
                     rope_n_elem: int, scale: float) -> Optional[torch.Tensor]:
        """A one-token decode step's attention in one kernel call (gemv.attend_decode), from the fused qkv row
        (B, 1, ...): the new key, rotated, and value written at position length - 1, the new query attending to
        positions 0 .. length - 1; returns (B, 1, n_head * head_size). None, with the cache untouched, where
        the kernel does not take the step: rotate, `update` and attend in PyTorch then."""
        return gemv.attend_decode(qkv, cos, sin, self.k, self.v, length, n_head, rope_n_elem, scale)
