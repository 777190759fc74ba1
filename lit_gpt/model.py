"""The Phi model: a GPT of Phi-1/1.5/2's blocks (attention and MLP in parallel, reading one shared LayerNorm) or of
the later family's (Phi-3, Phi-3.5, Phi-4-mini, phi-4: a sequential residual over two RMSNorms, a SwiGLU MLP), as
the config says (`parallel_residual`), with the later family's grouped-query attention, partial rotary, tied
embeddings, sliding window and longrope.

Read top to bottom: GPT -> Block -> CausalSelfAttention / MLP -> norms, masks and rotary helpers -> KVCache.
"""

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_gpt import gemv
from lit_gpt.config import Config

# tokens per forward when the cache is computed again with the other longrope factors (as generate's prefill chunks)
REFILL_CHUNK = 512


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.lm_head = Linear(config.n_embd, config.padded_vocab_size, bias=config.lm_head_bias)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=make_norm(config),
            )
        )
        if config.tie_embeddings:
            # one tensor, held in lit_model.pth once, as transformer.wte.weight (as transformers saves it)
            self.lm_head.weight = self.transformer.wte.weight
            self.register_state_dict_post_hook(_drop_tied_head)
            self.register_load_state_dict_pre_hook(_add_tied_head)
            self.register_load_state_dict_post_hook(_tie_head)
        self.long_rope = False  # longrope: whether the keys in the KV cache carry the long factors (see _sync_rope)
        self._cache_ids: Optional[torch.Tensor] = None  # longrope: the token ids in the KV cache (B, max_seq_length)
        # the blocks as gemv.decode_blocks runs them, with what they were made from (see _blocks_plan)
        self._decode_plan: Optional[tuple[tuple, list, Optional[gemv.BlocksPlan]]] = None
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
        """(Re)compute the rotary tables; needed after building the model on the meta device. With longrope, `cos` and
        `sin` hold the long factors' table (block_size rows), then the short factors' (see `rope_tables`)."""
        device = device or self.lm_head.weight.device
        c = self.config
        cos, sin = build_rope_cache(c.block_size, c.rope_n_elem, c.rope_base, device, c.rope_long_factor,
                                    c.longrope_scale if c.longrope else 1.0)
        if c.longrope:
            short = build_rope_cache(min(c.rope_original_max_seq_len, c.block_size), c.rope_n_elem, c.rope_base, device,
                                     c.rope_short_factor, c.longrope_scale)
            cos, sin = torch.cat((cos, short[0])), torch.cat((sin, short[1]))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def rope_tables(self, long: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin by position: with longrope, of the long or the short factors."""
        if not self.config.longrope:
            return self.cos, self.sin
        n = self.config.block_size
        return (self.cos[:n], self.sin[:n]) if long else (self.cos[n:], self.sin[n:])

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
        c = self.config
        self._decode_plan = None  # (it holds the old caches)
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, c.n_query_groups, max_seq_length, c.head_size, device, dtype)
        self.long_rope = False
        if c.longrope:
            self._cache_ids = torch.zeros(batch_size, max_seq_length, dtype=torch.long, device=device)

    def clear_kv_cache(self) -> None:
        self._decode_plan = None  # (it holds the caches)
        for block in self.transformer.h:
            block.attn.kv_cache = None
        self._cache_ids = None

    # under torch.compile (of this module) this frame stays eager and the functions it calls are traced: _forward
    # as the graph, _sync_rope not (disabled: it reads positions on the host and may run a prefill)
    @torch.compiler.disable(recursive=False)
    def forward(self, idx: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
                row: Optional[int] = None, last_only: bool = False) -> torch.Tensor:
        """Logits for token ids `idx` (B, T); with `last_only`, for the last position only, (B, 1, vocab) (a
        prefill, which samples from those alone: the LM head is ~5% of a prefill's arithmetic).

        Without `input_pos`: a plain causal forward over positions 0..T-1 (training, scoring).
        With `input_pos` (T positions): tokens are written into the KV cache at those positions and
        attend to everything cached before them (prefill of a prompt or of a new chat turn, decode).
        With `row`, idx is (1, T) and only that row of the cache is written and read (a server's prefill of one
        request while the other rows hold theirs). With `input_pos` of shape (B, 1): one decode step in which each
        of the cache's first B rows is at its own position (continuous batching, lit_gpt/batching.py).
        """
        if input_pos is not None and input_pos.dim() == 2 and (input_pos.size(1) != 1 or row is not None):
            raise ValueError(f"per-row positions are for one-token decode steps over every row: got input_pos of "
                             f"shape {tuple(input_pos.shape)}{'' if row is None else ' with a row'}")
        if input_pos is not None and self._cache_ids is not None:
            self._sync_rope(input_pos)
            if input_pos.dim() == 2:
                self._cache_ids.scatter_(1, input_pos, idx)
            else:
                cache_ids = self._cache_ids if row is None else self._cache_ids[row:row + 1]
                cache_ids.index_copy_(1, input_pos, idx)
        return self._forward(idx, input_pos, row=row, last_only=last_only)

    def _forward(self, idx: torch.Tensor, input_pos: Optional[torch.Tensor], logits: bool = True,
                 row: Optional[int] = None, last_only: bool = False) -> torch.Tensor:
        T = idx.size(1)
        c = self.config
        if input_pos is None:
            if T > c.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds the model's context {c.block_size}")
            cos, sin = self.rope_tables(c.longrope and T > c.rope_original_max_seq_len)
            cos, sin = cos[:T], sin[:T]
            window = None
        else:
            cos, sin = self.rope_tables(self.long_rope)
            cos, sin = cos[input_pos], sin[input_pos]
            if input_pos.dim() == 2:  # (B, 1, n): broadcast over the heads of (B, n_head, 1, head_size)
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            window = self.attention_window(input_pos)._replace(row=row)

        x = self.transformer.wte(idx)
        fused = None if input_pos is None else self.fused_decode(x, cos, sin, input_pos, window)
        if fused is not None:
            x = fused
        else:
            for block in self.transformer.h:
                x = block(x, cos, sin, input_pos, window)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.transformer.ln_f(x)) if logits else x

    def fused_decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor,
                     window: "Window") -> Optional[torch.Tensor]:
        """An eager one-token decode step on CPU through all the blocks in one kernel call (gemv.decode_blocks), from
        the embedded tokens x: the same result as the blocks' calls one by one, without the Python between them,
        which ran cold after each layer's weights had streamed through the caches. None, with the caches untouched,
        where the kernels do not take every block or the step."""
        if x.size(1) != 1 or not x.is_cpu or not gemv.available():  # (elsewhere: no plan to look for)
            return None  # (and, compiled without the kernels, no graph break: that compiles the whole graph)
        return self._decode_blocks(x, cos, sin, input_pos, window.row)

    # under torch.compile, a graph break: the one call runs as it does eagerly, between the compiled embedding and
    # head (traced, the blocks would call the kernels op by op, which is slower than this one call)
    @torch.compiler.disable
    def _decode_blocks(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor,
                       row: Optional[int]) -> Optional[torch.Tensor]:
        c = self.config
        return gemv.decode_blocks(self._blocks_plan(), x, cos, sin, input_pos, c.rope_n_elem,
                                  self.transformer.h[0].attn.scale, c.norm_eps, c.sliding_window or 0, row)

    def _blocks_plan(self) -> Optional[gemv.BlocksPlan]:
        """The blocks as gemv.decode_blocks runs them (gemv.plan_blocks over every block's decode_layer()), kept from
        step to step while the blocks hold the same modules and tensors at the same addresses: gathering and checking
        them took ~1 ms a step, cold Python between the kernels. Kept with it, what it was made from stays alive, so
        an equal fingerprint means the very same objects. (With autograd on, made afresh: they check requires_grad.)"""
        key, held = [], []
        _fingerprint(self.transformer.h, key, held)
        key = tuple(key)
        if self._decode_plan is None or self._decode_plan[0] != key or torch.is_grad_enabled():
            layers = [block.decode_layer() for block in self.transformer.h]
            self._decode_plan = (key, held, gemv.plan_blocks(layers, self.config.n_head))
        return self._decode_plan[2]

    def __getstate__(self) -> dict:
        # the blocks' plan holds this process's addresses (and a ctypes array, which does not pickle): a pickle or a
        # copy of the model makes its own
        return {**self.__dict__, "_decode_plan": None}

    @torch.compiler.disable
    def _sync_rope(self, input_pos: torch.Tensor) -> None:
        """Longrope: which factors the KV cache's keys carry when a sequence grows past rope_original_max_seq_len.

        As in transformers, the factors are those of the whole sequence's length: the short ones while it is at most
        rope_original_max_seq_len tokens, the long ones for every position beyond (its generate drops the cache at
        that point and processes the sequence again). So when a forward through the cache crosses that length,
        either way (a conversation that grows past it, or one cut back below it), the positions already cached are
        computed again from their token ids with the new factors, a prefill of at most that many tokens, once:
        the logits are those of the whole sequence in one forward, not of keys rotated with a mix of factors."""
        long = int(input_pos.max()) >= self.config.rope_original_max_seq_len
        if long == self.long_rope:
            return
        self.long_rope = long
        start = int(input_pos.min())
        if start > 0:
            self._refill(start)

    def _refill(self, end: int) -> None:
        """Compute the cache at positions 0 .. end - 1 again from its token ids (with the current rotary factors)."""
        with torch.no_grad():
            for begin in range(0, end, REFILL_CHUNK):
                pos = torch.arange(begin, min(begin + REFILL_CHUNK, end), device=self._cache_ids.device)
                self._forward(self._cache_ids[:, pos], pos, logits=False)

    def attention_window(self, input_pos: torch.Tensor) -> "Window":
        """The cache slots the queries at `input_pos` look at."""
        window = self.config.sliding_window
        if input_pos.dim() == 2:  # each row at its own position: a mask per row, (B, 1, 1, length)
            length = self.max_seq_length if torch.compiler.is_compiling() else int(input_pos.max()) + 1
            return Window(length, attention_mask(input_pos, length, window).unsqueeze(1))
        if torch.compiler.is_compiling():
            # static shapes: attend over the whole cache, masked (one graph for every step)
            return Window(self.max_seq_length, attention_mask(input_pos, self.max_seq_length, window))
        # eager: read only the filled part of the cache (the positions are on the host for free on CPU;
        # on GPU this is one tiny sync per step)
        end = int(input_pos[-1]) + 1
        if input_pos.numel() == 1:
            return Window(end, None, 0 if window is None else max(0, end - window))
        return Window(end, attention_mask(input_pos, end, window))


class Window(NamedTuple):
    """What a forward with `input_pos` attends to: cache positions 0 .. length - 1, through `mask` (T, length), or
    (B, 1, 1, length) for per-row positions (None: positions start .. length - 1, as for a single query at position
    length - 1); in cache row `row` only, or in every row (None)."""

    length: int
    mask: Optional[torch.Tensor]
    start: int = 0
    row: Optional[int] = None


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

    def decode_matrix(self) -> Optional[gemv.Matrix]:
        """The weight as gemv.decode_blocks reads it; None where the kernels cannot."""
        return gemv.bf16_matrix(self.weight, self.bias)


class Block(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.norm_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = None if config.parallel_residual else make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: Optional[torch.Tensor],
                window: Optional[Window]) -> torch.Tensor:
        h = self.norm_1(x)
        a = self.attn(h, cos, sin, input_pos, window)
        if self.norm_2 is None:  # parallel residual: attention and MLP both read the same normalized input
            return x + a + self.mlp(h)
        x = x + a
        return x + self.mlp(self.norm_2(x))

    def decode_layer(self) -> Optional[gemv.DecodeLayer]:
        """This block as gemv.decode_blocks reads it, with its KV cache: a parallel-residual one with our layer norm
        and a GELU MLP, or a sequential one with two RMS norms and a SwiGLU MLP (norms with the config's eps); else
        None."""
        attn, mlp, norm_1, norm_2 = self.attn, self.mlp, self.norm_1, self.norm_2
        if attn.kv_cache is None or norm_1.eps != attn.config.norm_eps:
            return None
        if norm_2 is None:
            if mlp.gated or not isinstance(norm_1, LayerNorm) or norm_1.weight is None or norm_1.bias is None:
                return None
            norms = (norm_1.weight, norm_1.bias, None)
        else:
            if (not mlp.gated or not isinstance(norm_1, RMSNorm) or not isinstance(norm_2, RMSNorm)
                    or norm_2.eps != norm_1.eps):
                return None
            norms = (norm_1.weight, None, norm_2.weight)
        matrices = [_decode_matrix(layer) for layer in (attn.attn, attn.proj, mlp.fc, mlp.proj)]
        return gemv.DecodeLayer(*norms, matrices, attn.kv_cache.k, attn.kv_cache.v)


def _fingerprint(module: nn.Module, key: list, held: list) -> None:
    """Every submodule and tensor under `module` into `held`, and into `key` their identities and the tensors'
    addresses (a module or tensor replaced, or a tensor's data moved, changes it). Plain dict walks: ~0.1 ms for
    phi-2's blocks."""
    for tensors in (module._parameters, module._buffers):
        for t in tensors.values():
            if t is not None:
                key += (id(t), t.data_ptr())
                held.append(t)
    for sub in module._modules.values():
        if sub is not None:
            key.append(id(sub))
            held.append(sub)
            _fingerprint(sub, key, held)


def _decode_matrix(layer: nn.Module) -> Optional[gemv.Matrix]:
    """A layer's weight as gemv.decode_blocks reads it (our Linear and the quantized ones say; others: None)."""
    matrix = getattr(layer, "decode_matrix", None)
    return None if matrix is None else matrix()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        # q, k and v fused in one matmul, laid out per query group: [q.. , k, v] for each group
        # (lit-gpt's layout, so lit-gpt checkpoints load as they are)
        qkv_size = (config.n_head + 2 * config.n_query_groups) * config.head_size
        self.attn = Linear(config.n_embd, qkv_size, bias=config.bias)
        self.proj = Linear(config.n_head * config.head_size, config.n_embd, bias=config.bias)
        self.config = config
        self.scale = 1.0 / math.sqrt(config.head_size)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: Optional[torch.Tensor],
                window: Optional[Window]) -> torch.Tensor:
        B, T, _ = x.shape
        c, scale = self.config, self.scale
        qkv = self.attn(x)
        if input_pos is None:
            q, k, v = self.heads(qkv, cos, sin)
            banded = c.sliding_window is not None and T > c.sliding_window
            mask = attention_mask(torch.arange(T, device=x.device), T, c.sliding_window) if banded else None
            y = self.attention(q, k, v, mask, scale, causal=not banded)
        else:
            if self.kv_cache is None:
                raise RuntimeError("call model.set_kv_cache(batch_size) before decoding with input_pos")
            one_position = input_pos.dim() == 1
            if T == 1:
                # an eager decode step on CPU: rotary embedding, cache write and attention in one kernel call
                y = self.kv_cache.fused_decode(qkv, cos, sin, input_pos, c.n_head, c.rope_n_elem, scale,
                                               c.sliding_window, window.row)
                if y is not None:
                    return self.proj(y)
            q, k, v = self.heads(qkv, cos, sin)
            k, v = self.kv_cache.update(input_pos, k, v, window.row)
            # a decode step on CPU (see gemv.c); needs no mask
            y = gemv.attend_one(q, k, v, input_pos, scale, c.sliding_window or 0) if one_position else None
            if y is None:
                s, e = window.start, window.length
                y = self.attention(q, k[:, :, s:e], v[:, :, s:e], window.mask, scale)
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
    """Phi-1/1.5/2: fc, GELU (tanh), proj. The later family: SwiGLU, proj(silu(gate) * up), with gate and up in one
    matrix `fc`, gate rows first (the checkpoints' gate_up_proj)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gated = config.mlp_class_name == "LLaMAMLP"
        self.fc = Linear(config.n_embd, (2 if self.gated else 1) * config.intermediate_size, bias=config.bias)
        self.proj = Linear(config.intermediate_size, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            h = self.fc(x)
            g = gemv.gelu_tanh(h)  # a decode step on CPU
            return self.proj(F.gelu(h, approximate="tanh") if g is None else g)
        gate_up = self.fc(x)
        g = gemv.silu_mul(gate_up)  # a decode step on CPU
        if g is None:
            gate, up = gate_up.chunk(2, dim=-1)
            g = F.silu(gate) * up
        return self.proj(g)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, normalized in float32 and cast back before the weight multiplies it (as
    the checkpoints' Phi3RMSNorm does, so that bf16 results match theirs too). The few bf16 rows of a decode step on
    CPU go through our kernel (gemv.rms_norm, as the blocks' norms in gemv.decode_blocks)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = gemv.rms_norm(x, self.weight, self.eps)
        if y is not None:
            return y
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters, same state dict) whose few bf16 rows of a decode step on CPU go through our
    kernel (gemv.layer_norm, as the blocks' norms in gemv.decode_blocks: a step computes the same either way)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = gemv.layer_norm(x, self.weight, self.bias, self.eps) if len(self.normalized_shape) == 1 else None
        return super().forward(x) if y is None else y


def make_norm(config: Config) -> nn.Module:
    if config.norm_class_name == "RMSNorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return LayerNorm(config.n_embd, eps=config.norm_eps)


def attention_mask(input_pos: torch.Tensor, length: int, sliding_window: Optional[int]) -> torch.Tensor:
    """(T, length), True where the query at position input_pos[t] sees position j: j <= its position and, with a
    sliding window, j > its position - sliding_window (transformers' sliding_window_overlay)."""
    j = torch.arange(length, device=input_pos.device)
    pos = input_pos.unsqueeze(-1)
    mask = j <= pos
    return mask if sliding_window is None else mask & (j > pos - sliding_window)


def build_rope_cache(seq_len: int, n_elem: int, base: int, device: Optional[torch.device] = None,
                     factors: Optional[list] = None, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (seq_len, n_elem), float32, in the "rotate half" layout. longrope: each frequency
    divided by its factor, cos and sin multiplied by `scale`."""
    exponents = torch.arange(0, n_elem, 2, device=device, dtype=torch.float32) / n_elem
    if factors is None:
        inv_freq = 1.0 / (base ** exponents)
    else:
        inv_freq = 1.0 / (torch.tensor(factors, device=device, dtype=torch.float32) * base ** exponents)
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    freqs = torch.cat((freqs, freqs), dim=-1)
    if scale == 1.0:
        return freqs.cos(), freqs.sin()
    return freqs.cos() * scale, freqs.sin() * scale


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

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               row: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys and values (B, n_query_groups, T, head_size) at the T positions `input_pos`, or each row's one
        at its own position (input_pos (B, 1)); return the whole cache. With `row`, k and v are one sequence's
        (B = 1), written into and returned from that row of the cache. Per-row positions may cover the first B rows
        of the cache only (a server's step over its busy rows)."""
        if input_pos.dim() == 2:  # rows 0 .. B - 1 of the cache, B <= its batch size
            B = k.size(0)
            rows = torch.arange(B, device=k.device)
            self.k[rows, :, input_pos[:, 0]] = k[:, :, 0].to(self.k.dtype)
            self.v[rows, :, input_pos[:, 0]] = v[:, :, 0].to(self.v.dtype)
            return self.k[:B], self.v[:B]
        keys, values = (self.k, self.v) if row is None else (self.k[row:row + 1], self.v[row:row + 1])
        keys.index_copy_(2, input_pos, k.to(keys.dtype))
        values.index_copy_(2, input_pos, v.to(values.dtype))
        return keys, values

    def fused_decode(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor,
                     n_head: int, rope_n_elem: int, scale: float, sliding_window: Optional[int] = None,
                     row: Optional[int] = None) -> Optional[torch.Tensor]:
        """A one-token decode step's attention in one kernel call (gemv.attend_decode), from the fused qkv rows
        (B, 1, ...): the new keys, rotated, and values written at `input_pos` (one position, or (B, 1): each of
        the cache's first B rows at its own), each new query attending to its positions up to there (the last
        sliding_window of them); returns (B, 1, n_head * head_size). None, with the cache untouched, where the
        kernel does not take the step: rotate, `update` and attend in PyTorch then. With `row`, the step is that
        cache row's (qkv (1, 1, ...))."""
        first = row or 0
        rows = slice(first, first + qkv.size(0))
        return gemv.attend_decode(qkv, cos, sin, self.k[rows], self.v[rows], input_pos, n_head, rope_n_elem, scale,
                                  sliding_window or 0)


def _drop_tied_head(model: GPT, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """Tied embeddings: the LM head's weight is the embedding's, saved once under its name."""
    if model.lm_head.weight is model.transformer.wte.weight:
        del state_dict[prefix + "lm_head.weight"]


def _add_tied_head(model: GPT, state_dict: dict, prefix: str, *args) -> None:
    """Tied embeddings: a state dict without the LM head's weight gives it the embedding's (a quantized head, which
    is not tied, brings its own)."""
    wte = state_dict.get(prefix + "transformer.wte.weight")
    if isinstance(model.lm_head, nn.Linear) and prefix + "lm_head.weight" not in state_dict and wte is not None:
        state_dict[prefix + "lm_head.weight"] = wte


def _tie_head(model: GPT, incompatible_keys) -> None:
    """After load_state_dict(assign=True) the head and the embedding are two parameters on one tensor: one again."""
    if isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.transformer.wte.weight
