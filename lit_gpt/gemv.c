// Matrix-vector products for batch-1 decode on x86 CPUs with AVX-512 BF16 (Zen 4, Sapphire Rapids, ...).
//
// A decode step multiplies one activation row by every weight matrix, so it is bound by how fast the
// weights stream from memory. These kernels read the weights front to back as they are stored (one row
// after the other: one sequential stream per thread, which the hardware prefetcher follows best; four
// interleaved rows measured ~40% slower on 2560-wide rows), and accumulate in fp32 with vdpbf16ps.
// Threads split the rows into contiguous ranges (OpenMP: the same runtime as torch, whose libgomp this
// library binds to when loaded after torch).
//
// Built and loaded by lit_gpt/gemv.py; the results match F.linear up to fp32 summation order.

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float bias_at(const uint16_t *bias, int64_t n) { return bias ? bf16_to_f32(bias[n]) : 0.0f; }

// ---- bf16 weights: vdpbf16ps multiplies pairs of bf16 and adds them into fp32 lanes -------------------

static inline __m512 dp_bf16(__m512 acc, const uint16_t *w, const uint16_t *x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w), (__m512bh)_mm512_loadu_si512(x));
}

static float dot_bf16(const uint16_t *w, const uint16_t *x, int64_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();  // two chains hide the dpbf16 latency
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        a0 = dp_bf16(a0, w + k, x + k);
        a1 = dp_bf16(a1, w + k + 32, x + k + 32);
    }
    for (; k + 32 <= K; k += 32) a0 = dp_bf16(a0, w + k, x + k);
    if (k < K) {  // the last K % 32 columns, zero-padded
        __mmask32 m = _cvtu32_mask32((1u << (K - k)) - 1u);
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(m, w + k), (__m512bh)_mm512_maskz_loadu_epi16(m, x + k));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

// y[n] = bias[n] + sum_k w[n, k] x[k]; all bf16, bias may be NULL.
void gemv_bf16(const uint16_t *w, const uint16_t *x, const uint16_t *bias, uint16_t *y, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static)  // static: each thread one contiguous range of rows
    for (int64_t n = 0; n < N; n++) y[n] = f32_to_bf16(dot_bf16(w + n * K, x, K) + bias_at(bias, n));
}

// ---- int8 weights with one scale per row: y[n] = scale[n] * sum_k q[n, k] x[k] + bias[n] -------------
//
// Converting int8 to fp32 and using fp32 FMAs costs ~4x the instructions per byte of bf16 and is
// compute-bound here. Instead each weight goes through vdpbf16ps as two exact bf16 numbers: with
// u = q + 128 = 16 h + l (h, l in 0..15), the bf16 with bits 0x4300 | v is 128 + v, so
//   sum_k q x = 16 sum_k (128 + h) x + sum_k (128 + l) x - (16 * 128 + 128 + 128) sum_k x.
// The cancellation costs ~5 of fp32's 24 bits, far below the bf16 output's 8.

// int8 rows are converted on the way, which leaves the hardware prefetcher behind: ask 2 KB ahead
// (measured: 0, 1 and 2 KB; bf16 reads best without)
#define INT8_PREFETCH 2048

static float dot_int8(const int8_t *w, const uint16_t *x, int64_t K) {
    const __m512i flip = _mm512_set1_epi8((char)0x80), low = _mm512_set1_epi16(0x000F), exp = _mm512_set1_epi16(0x4300);
    __m512 h0 = _mm512_setzero_ps(), l0 = _mm512_setzero_ps(), h1 = _mm512_setzero_ps(), l1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        _mm_prefetch((const char *)(w + k) + INT8_PREFETCH, _MM_HINT_T0);
        __m512i u = _mm512_xor_si512(_mm512_loadu_si512(w + k), flip);  // q + 128, as unsigned bytes
        __m512i a = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(u));      // columns k .. k+31
        __m512i b = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(u, 1)); // columns k+32 .. k+63
        __m512i xa = _mm512_loadu_si512(x + k), xb = _mm512_loadu_si512(x + k + 32);
        l0 = _mm512_dpbf16_ps(l0, (__m512bh)_mm512_ternarylogic_epi32(a, low, exp, 0xEA), (__m512bh)xa);  // (a & low) | exp
        h0 = _mm512_dpbf16_ps(h0, (__m512bh)_mm512_or_si512(_mm512_srli_epi16(a, 4), exp), (__m512bh)xa);
        l1 = _mm512_dpbf16_ps(l1, (__m512bh)_mm512_ternarylogic_epi32(b, low, exp, 0xEA), (__m512bh)xb);
        h1 = _mm512_dpbf16_ps(h1, (__m512bh)_mm512_or_si512(_mm512_srli_epi16(b, 4), exp), (__m512bh)xb);
    }
    float sum = 16.0f * _mm512_reduce_add_ps(_mm512_add_ps(h0, h1)) + _mm512_reduce_add_ps(_mm512_add_ps(l0, l1));
    // each column above added (q + 2304) x; the last K % 64 columns add the same, one at a time
    for (; k < K; k++) sum += ((float)w[k] + 2304.0f) * bf16_to_f32(x[k]);
    return sum;
}

void gemv_int8(const int8_t *w, const uint16_t *x, const uint16_t *scales, const uint16_t *bias, uint16_t *y,
               int64_t N, int64_t K) {
    float x_sum = 0.0f;
    for (int64_t k = 0; k < K; k++) x_sum += bf16_to_f32(x[k]);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float dot = dot_int8(w + n * K, x, K) - 2304.0f * x_sum;
        y[n] = f32_to_bf16(dot * bf16_to_f32(scales[n]) + bias_at(bias, n));
    }
}

// ---- int4 weights in PyTorch's CPU layout (aten._convert_weight_to_int4pack_for_cpu, AVX-512 build) ------
//
// Rows come in blocks of 64; for each column k a block stores 32 bytes, byte j holding row j in its low
// nibble and row j + 32 in its high one. scales_and_zeros is (K / group, N, 2) bf16 and the weight is
// W[n, k] = (q - 8) * scale + zero. Two columns at a
// time become bf16 pairs for vdpbf16ps (0x4300 | q is the bf16 of 128 + q), so per group g
//   sum_{k in g} W x = scale * sum (128 + q) x + (zero - 136 * scale) * X_g,  X_g = sum_{k in g} x.

#define INT4_BLOCK 64

// the (128 + q) pairs of columns k, k+1 for 16 rows, from 16 bytes of each column
static inline void pairs16(const uint8_t *a, const uint8_t *b, __m512i *low_rows, __m512i *high_rows) {
    const __m512i nibble = _mm512_set1_epi32(0x000F000F), exp = _mm512_set1_epi32(0x43004300);
    __m512i v = _mm512_or_si512(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)a)),
                                _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b)), 16));
    *low_rows = _mm512_ternarylogic_epi32(v, nibble, exp, 0xEA);  // (v & nibble) | exp
    *high_rows = _mm512_ternarylogic_epi32(_mm512_srli_epi32(v, 4), nibble, exp, 0xEA);
}

// one block of 64 rows: out[r] = sum_k W[r, k] x[k]
static void block_int4(const uint8_t *w, const uint32_t *sz, int64_t N, const uint16_t *x, const float *x_group,
                       int64_t K, int64_t group, float *out) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const uint32_t *x_pairs = (const uint32_t *)x;
    for (int64_t g = 0; g < K / group; g++) {
        __m512 t[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t k = g * group; k < (g + 1) * group; k += 2) {
            const uint8_t *a = w + k * 32, *b = a + 32;
            __m512bh xp = (__m512bh)_mm512_set1_epi32((int)x_pairs[k / 2]);
            __m512i r0, r32, r16, r48;
            pairs16(a, b, &r0, &r32);            // rows 0..15 and 32..47
            pairs16(a + 16, b + 16, &r16, &r48); // rows 16..31 and 48..63
            t[0] = _mm512_dpbf16_ps(t[0], (__m512bh)r0, xp);
            t[1] = _mm512_dpbf16_ps(t[1], (__m512bh)r16, xp);
            t[2] = _mm512_dpbf16_ps(t[2], (__m512bh)r32, xp);
            t[3] = _mm512_dpbf16_ps(t[3], (__m512bh)r48, xp);
        }
        __m512 xg = _mm512_set1_ps(x_group[g]), c136 = _mm512_set1_ps(136.0f);
        const uint32_t *s = sz + g * N;  // (scale, zero) of this group, one uint32 per row
        for (int i = 0; i < 4; i++) {
            __m512i pair = _mm512_loadu_si512(s + 16 * i);
            __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
            __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32((int)0xFFFF0000u)));
            acc[i] = _mm512_fmadd_ps(scale, t[i], acc[i]);
            acc[i] = _mm512_fmadd_ps(_mm512_fnmadd_ps(c136, scale, zero), xg, acc[i]);
        }
    }
    for (int i = 0; i < 4; i++) _mm512_storeu_ps(out + 16 * i, acc[i]);
}

// N: rows as stored (a multiple of 64); the first n_out rows are written to y.
void gemv_int4(const uint8_t *w, const uint16_t *x, const uint16_t *scales_and_zeros, const uint16_t *bias,
               uint16_t *y, int64_t N, int64_t n_out, int64_t K, int64_t group) {
    float *x_group = malloc((K / group) * sizeof(float));
    for (int64_t g = 0; g < K / group; g++) {
        float s = 0.0f;
        for (int64_t k = g * group; k < (g + 1) * group; k++) s += bf16_to_f32(x[k]);
        x_group[g] = s;
    }
    int64_t blocks = N / INT4_BLOCK;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        float out[INT4_BLOCK];
        block_int4(w + b * INT4_BLOCK * K / 2, (const uint32_t *)scales_and_zeros + b * INT4_BLOCK, N, x, x_group, K,
                   group, out);
        for (int r = 0; r < INT4_BLOCK; r++) {
            int64_t n = b * INT4_BLOCK + r;
            if (n < n_out) y[n] = f32_to_bf16(out[r] + bias_at(bias, n));
        }
    }
    free(x_group);
}

// ---- attention of one new token over the cached keys and values -----------------------------------------
//
// PyTorch's CPU flash attention is built for blocks of queries; for the single query of a decode step it
// measured 0.3 ms per layer at 128 cached positions and 6.8 ms at 2048 (more than reading the layer's
// weights). Here each (sequence, head) is one loop over the cache: scores in fp32, softmax, weighted sum
// of the values, reading keys and values once.

#define MAX_HEAD_SIZE 256

static inline __m512 load_bf16x16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

static inline __m512 exp16(__m512 x) {  // e^x for x <= 0: 2^n * e^r, |r| <= ln2 / 2, Taylor to r^7 (~1e-8)
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718f));
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

// One (sequence, head): softmax(q . k_l * scale) over l < L, times the values. q, y: hs; k, v: (L.., hs).
static void attend_head(const uint16_t *q, const uint16_t *kh, const uint16_t *vh, uint16_t *y, int64_t L, int64_t hs,
                        float scale) {
    int64_t chunks = (hs + 15) / 16;
    __mmask16 mask[MAX_HEAD_SIZE / 16];
    __m512 qf[MAX_HEAD_SIZE / 16], acc[MAX_HEAD_SIZE / 16];
    for (int64_t c = 0; c < chunks; c++) {
        int64_t left = hs - 16 * c;
        mask[c] = _cvtu32_mask16(left >= 16 ? 0xFFFFu : (1u << left) - 1u);
        qf[c] = _mm512_mul_ps(load_bf16x16(q + 16 * c, mask[c]), _mm512_set1_ps(scale));
        acc[c] = _mm512_setzero_ps();
    }
    float *s = malloc((L + 16) * sizeof(float));
    float top = -INFINITY;
    for (int64_t l = 0; l < L; l++) {
        __m512 d = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; c++) d = _mm512_fmadd_ps(qf[c], load_bf16x16(kh + l * hs + 16 * c, mask[c]), d);
        s[l] = _mm512_reduce_add_ps(d);
        top = s[l] > top ? s[l] : top;
    }
    __m512 total = _mm512_setzero_ps();
    for (int64_t l = 0; l < L; l += 16) {
        __mmask16 m = _cvtu32_mask16(L - l >= 16 ? 0xFFFFu : (1u << (L - l)) - 1u);
        __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + l), _mm512_set1_ps(top))));
        _mm512_mask_storeu_ps(s + l, m, e);
        total = _mm512_add_ps(total, e);
    }
    for (int64_t l = 0; l < L; l++) {
        __m512 p = _mm512_set1_ps(s[l]);
        for (int64_t c = 0; c < chunks; c++) acc[c] = _mm512_fmadd_ps(p, load_bf16x16(vh + l * hs + 16 * c, mask[c]), acc[c]);
    }
    free(s);
    float inv = 1.0f / _mm512_reduce_add_ps(total), out[16];
    for (int64_t c = 0; c < chunks; c++) {
        _mm512_storeu_ps(out, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
        for (int64_t i = 0; i < 16 && 16 * c + i < hs; i++) y[16 * c + i] = f32_to_bf16(out[i]);
    }
}

// q: (B, n_head, hs); k, v: (B, n_groups, S, hs), of which positions 0 .. L-1 are attended; y: (B, n_head, hs).
// Query heads share key/value heads in consecutive runs of n_head / n_groups (grouped-query attention).
void attend_one(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *y, int64_t B, int64_t n_head,
                int64_t n_groups, int64_t S, int64_t L, int64_t hs, float scale) {
#pragma omp parallel for schedule(static)
    for (int64_t bh = 0; bh < B * n_head; bh++) {
        int64_t b = bh / n_head, g = (bh % n_head) / (n_head / n_groups);
        int64_t kv = (b * n_groups + g) * S * hs;
        attend_head(q + bh * hs, k + kv, v + kv, y + bh * hs, L, hs, scale);
    }
}

// ---- the whole attention of a decode step: rotary embedding, cache write, attention -----------------------
//
// In eager PyTorch the rotary embedding, the split of the fused qkv row and the cache writes are ~25 small
// ops per layer; after each layer's weights have streamed through the caches they measured ~0.5 ms per
// layer, as much as reading a fifth of the layer's bf16 weights. Here they are one call.

// GPT-NeoX "rotate half" on the first n_elem dims, rounded to bf16 after each product and after the sum,
// exactly as apply_partial_rope computes it in bf16 (cos and sin rounded to bf16 first).
static void rope_bf16(const uint16_t *x, const float *cos, const float *sin, uint16_t *out, int64_t hs, int64_t n_elem) {
    int64_t half = n_elem / 2;
    for (int64_t i = 0; i < n_elem; i++) {
        float r = bf16_to_f32(x[i]), turned = i < half ? -bf16_to_f32(x[i + half]) : bf16_to_f32(x[i - half]);
        float c = bf16_to_f32(f32_to_bf16(cos[i])), s = bf16_to_f32(f32_to_bf16(sin[i]));
        out[i] = f32_to_bf16(bf16_to_f32(f32_to_bf16(r * c)) + bf16_to_f32(f32_to_bf16(turned * s)));
    }
    memmove(out + n_elem, x + n_elem, (hs - n_elem) * sizeof(uint16_t));
}

// qkv: (B, n_groups, q_per_kv + 2, hs), each group's query heads, then its key and value (the model's fused
// layout); cos, sin: n_elem floats for position pos; k, v: the cache (B, n_groups, S, hs), written at pos;
// y: (B, n_head, hs), attending to positions 0 .. pos.
void attend_decode(const uint16_t *qkv, const float *cos, const float *sin, uint16_t *k, uint16_t *v, uint16_t *y,
                   int64_t B, int64_t n_head, int64_t n_groups, int64_t S, int64_t pos, int64_t hs, int64_t n_elem,
                   float scale) {
    int64_t q_per_kv = n_head / n_groups, stride = (q_per_kv + 2) * hs;
    for (int64_t bg = 0; bg < B * n_groups; bg++) {
        const uint16_t *group = qkv + bg * stride;
        rope_bf16(group + q_per_kv * hs, cos, sin, k + (bg * S + pos) * hs, hs, n_elem);
        memcpy(v + (bg * S + pos) * hs, group + (q_per_kv + 1) * hs, hs * sizeof(uint16_t));
    }
#pragma omp parallel for schedule(static)
    for (int64_t bh = 0; bh < B * n_head; bh++) {
        int64_t bg = bh / q_per_kv;
        uint16_t q[MAX_HEAD_SIZE];
        rope_bf16(qkv + bg * stride + (bh % q_per_kv) * hs, cos, sin, q, hs, n_elem);
        attend_head(q, k + bg * S * hs, v + bg * S * hs, y + bh * hs, pos + 1, hs, scale);
    }
}
