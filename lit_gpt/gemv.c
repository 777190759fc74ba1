// Matrix-vector products for batch-1 decode on x86 CPUs with AVX-512 BF16, VNNI and VBMI (Zen 4, Sapphire
// Rapids, ...), and the attention of a decode step.
//
// A decode step multiplies one activation row by every weight matrix, so it is bound by how fast the
// weights stream from memory. These kernels read the weights front to back as they are stored (one
// sequential stream per thread, which the hardware prefetcher follows best), bf16 with vdpbf16ps into
// fp32, int8 and int4 with vpdpbusd into int32 against an 8-bit copy of the activations (per block of 32).
// Threads take the rows in chunks of ~1 MB of weights as they go (OpenMP dynamic schedule: the same
// runtime as torch, whose libgomp this library binds to when loaded after torch). An even static split
// left one thread waiting for the other: on these shared 2-core machines one core often streams slower,
// and the phi-2 int4 products measured 9-15 ms per step of such waiting (out of 51-70 ms); 1 MB chunks
// gained 3-7% per decode step over it, 64 KB chunks lost up to 10% (the streams restart too often).
//
// Built and loaded by lit_gpt/gemv.py; the results match F.linear up to fp32 summation order (and, for
// int8/int4, the activations' rounding to 8 bits per block of 32: at most 1/254 of the block's largest value).

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

// the first `left` of 16 lanes (all for left >= 16, none for left <= 0): a loop's last, partial vector
static inline __mmask16 first_lanes(int64_t left) {
    return _cvtu32_mask16(left >= 16 ? 0xFFFFu : left <= 0 ? 0u : (1u << left) - 1u);
}

// the first `left` of 64 bytes (all for left >= 64; left > 0): a loop's last, partial vector of bytes
static inline __mmask64 first_bytes(int64_t left) {
    return left >= 64 ? ~(__mmask64)0 : _cvtu64_mask64(((uint64_t)1 << left) - 1);
}

static inline __m512 widen_bf16x16(__m256i h) {  // 16 bf16 values as fp32 (exact)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __m512 load_bf16x16(const uint16_t *p, __mmask16 m) {
    return widen_bf16x16(_mm256_maskz_loadu_epi16(m, p));
}

static inline __m256i f32x16_to_bf16(__m512 v) {  // round to nearest even (vcvtneps2bf16)
    return (__m256i)_mm512_cvtneps_pbh(v);
}

// Rows wider than this (with the activation row they are multiplied by) do not stay in a 32 KB L1 data
// cache together: the activations are then reloaded from L2 for every row, and those reloads slowed the
// weight stream (10240-wide rows measured ~25% slower than 2560-wide ones). Such rows go four at a time,
// each activation load serving four rows; narrow rows go one at a time, which streams best for them
// (four at a time measured ~15% slower on 2560-wide rows).
#define WIDE_ROW_BYTES 16384
#define ROWS 4  // rows per pass for wide rows
#define CHUNK_BYTES (1 << 20)  // of weights, per piece of work a thread takes

static inline int64_t chunk_of(int64_t bytes_per_item) {
    return bytes_per_item >= CHUNK_BYTES ? 1 : CHUNK_BYTES / bytes_per_item;
}

// ---- bf16 weights: vdpbf16ps multiplies pairs of bf16 and adds them into fp32 lanes -------------------

// out[r] = sum_k w[r * K + k] x[k] for R rows (two accumulators per row hide the dpbf16 latency)
static inline __attribute__((always_inline)) void dot_bf16(const uint16_t *w, const uint16_t *x, int64_t K, int R,
                                                           float *out) {
    __m512 a0[ROWS], a1[ROWS];
    for (int r = 0; r < R; r++) a0[r] = a1[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + k), x1 = (__m512bh)_mm512_loadu_si512(x + k + 32);
        for (int r = 0; r < R; r++) {
            a0[r] = _mm512_dpbf16_ps(a0[r], (__m512bh)_mm512_loadu_si512(w + r * K + k), x0);
            a1[r] = _mm512_dpbf16_ps(a1[r], (__m512bh)_mm512_loadu_si512(w + r * K + k + 32), x1);
        }
    }
    for (; k < K; k += 32) {  // the last K % 64 columns, zero-padded
        __mmask32 m = _cvtu32_mask32(K - k >= 32 ? 0xFFFFFFFFu : (1u << (K - k)) - 1u);
        __m512bh x0 = (__m512bh)_mm512_maskz_loadu_epi16(m, x + k);
        for (int r = 0; r < R; r++)
            a0[r] = _mm512_dpbf16_ps(a0[r], (__m512bh)_mm512_maskz_loadu_epi16(m, w + r * K + k), x0);
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
}

// ---- bf16 weights times a few rows (2 .. FEW_ROWS: a decode step of a batch of sequences) -------------------
//
// Each weight vector loaded serves every row, so M rows cost about one read of the weights, like one row, plus
// M times the arithmetic: R weight rows per pass (R x M accumulators in registers) share each activation load.
// The activation rows (M x K bf16, up to 160 KB for 10240-wide rows) stay in the L1/L2 caches. Past 8 rows the
// arithmetic sets the speed and oneDNN's matmul kept up with this (12 rows) or beat it (15: fewer registers for
// rows per pass, more activation loads).

// The most rows gemv_bf16 takes: set in lit_gpt/gemv.py, which passes it to the compiler (-DFEW_ROWS=...).
#ifndef FEW_ROWS
#error "FEW_ROWS is not set: lit_gpt/gemv.py builds this file with -DFEW_ROWS=..."
#elif FEW_ROWS > 8
#error "FEW_ROWS above 8 needs cases in pass_bf16 and a rows_per_pass that keeps R x M <= 24"
#endif
// Here the hardware prefetcher alone left memory idle while the rows computed: the weights are asked for
// this many columns (1 KB) ahead of their use.
#define PREFETCH_AHEAD 512

static inline __attribute__((always_inline)) void dot_bf16_rows(const uint16_t *w, const uint16_t *x, int64_t K,
                                                                const int R, const int M, float *out) {
    __m512 a[4][FEW_ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) a[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __mmask32 mask = _cvtu32_mask32(K - k >= 32 ? 0xFFFFFFFFu : (1u << (K - k)) - 1u);
        __m512bh wv[4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(w + r * K + k + PREFETCH_AHEAD), _MM_HINT_T0);
            wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * K + k);
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) {
            __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) a[r][m] = _mm512_dpbf16_ps(a[r][m], wv[r], xv);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) out[r * M + m] = _mm512_reduce_add_ps(a[r][m]);
}

static inline int rows_per_pass(int M) { return M <= 6 ? 4 : 3; }  // <= 24 accumulators, of 32 registers

// out[r * M + m] for the R = rows_per_pass(M) weight rows at w (R = 1 where full is 0); one case per M, so that
// each has its accumulators in registers
static void pass_bf16(const uint16_t *w, const uint16_t *x, int64_t K, int M, int full, float *out) {
#define PASS_CASE(m) case m: dot_bf16_rows(w, x, K, full ? rows_per_pass(m) : 1, m, out); break;
    switch (M) {
        PASS_CASE(2) PASS_CASE(3) PASS_CASE(4) PASS_CASE(5) PASS_CASE(6) PASS_CASE(7) PASS_CASE(8)
    }
#undef PASS_CASE
}

// one row: y[n] = bias[n] + sum_k w[n, k] x[k]
static void gemv_bf16_one(const uint16_t *w, const uint16_t *x, const uint16_t *bias, uint16_t *y, int64_t N,
                          int64_t K) {
    int R = 4 * K > WIDE_ROW_BYTES ? ROWS : 1;  // a row and x: 2 + 2 bytes per column
#pragma omp parallel for schedule(dynamic, chunk_of(R * K * 2))
    for (int64_t n = 0; n < N; n += R) {
        int rows = N - n < R ? (int)(N - n) : R;
        float out[ROWS];
        if (rows == ROWS)
            dot_bf16(w + n * K, x, K, ROWS, out);  // (R a constant once inlined: the accumulators stay in registers)
        else
            for (int r = 0; r < rows; r++) dot_bf16(w + (n + r) * K, x, K, 1, out + r);
        for (int r = 0; r < rows; r++) y[n + r] = f32_to_bf16(out[r] + bias_at(bias, n + r));
    }
}

// 2 <= M <= FEW_ROWS rows
static void gemv_bf16_few(const uint16_t *w, const uint16_t *x, const uint16_t *bias, uint16_t *y, int64_t N,
                          int64_t K, int64_t M) {
    const int R = rows_per_pass((int)M);
#pragma omp parallel for schedule(dynamic, chunk_of(R * K * 2))
    for (int64_t n = 0; n < N; n += R) {
        float out[4 * FEW_ROWS];
        int rows = N - n < R ? (int)(N - n) : R;
        if (rows == R)
            pass_bf16(w + n * K, x, K, (int)M, 1, out);
        else
            for (int r = 0; r < rows; r++) pass_bf16(w + (n + r) * K, x, K, (int)M, 0, out + r * M);
        for (int r = 0; r < rows; r++)
            for (int m = 0; m < M; m++) y[m * N + n + r] = f32_to_bf16(out[r * M + m] + bias_at(bias, n + r));
    }
}

// y (M, N) = x (M, K) w^T + bias (bias[n] added to every row, or NULL), all bf16, 1 <= M <= FEW_ROWS
void gemv_bf16(const uint16_t *w, const uint16_t *x, const uint16_t *bias, uint16_t *y, int64_t N, int64_t K,
               int64_t M) {
    if (M == 1)
        gemv_bf16_one(w, x, bias, y, N, K);
    else
        gemv_bf16_few(w, x, bias, y, N, K, M);
}

// ---- the activation row in 8 bits per block of 32, for the integer dot products of the int8/int4 kernels ---
//
// vpdpbusd multiplies 64 unsigned by 64 signed bytes and adds each four products into an int32 lane: twice
// the products per instruction of vdpbf16ps, with no widening of the weights. The bf16 activations become,
// per block of 32 columns, x[k] ~ step * xq[k] with xq a signed byte (|xq| <= 127, round to nearest): one
// vpdpbusd per 64 weight bytes. (A 16-bit form, as a high and a low byte, took two per 64 bytes and four
// for int4's unpacked nibbles; the integer dot products, not memory, then set the speed at high bandwidth.)
// The error is at most half a step, 1/254 of the block's largest |x|, as in llama.cpp's q8_0 activations.
// The weights enter as the unsigned operand (int4: q in 0..15; int8: q + 128).

#define XBLOCK 32
// Products of this many rows of x or more go through the tiles below ("several rows"); fewer rows (a decode step)
// go row by row, each load of the weights serving all of them: faster where reading the weights sets the speed
// (int8 and int4 alike: at 4 rows row by row, at 5 the tiles, measured over 12 of phi-2's layers).
#define TILED_FROM 5

typedef struct {
    int8_t *q;      // K bytes, zero-padded to a multiple of 64
    float *step;    // per block of 32 columns: lanes 0-7 of a 64-column vector use block 2i, lanes 8-15 2i+1
    float *sum;     // per block: the sum of its x as quantized, step * sum(xq)
    float *lanes;   // per 64 columns, 16 floats: the steps as the int32 lanes of one vpdpbusd need them
    int finite;     // 0 if x holds an infinity or NaN
} q8_x;

static int q8_x_make(q8_x *f, const uint16_t *x, int64_t K) {
    int64_t padded = (K + 63) / 64 * 64, blocks = padded / XBLOCK;
    f->q = aligned_alloc(64, padded);
    f->step = aligned_alloc(64, (2 * blocks + 8 * blocks) * sizeof(float));  // (a multiple of 64 bytes)
    if (!f->q || !f->step) {
        free(f->q);
        free(f->step);
        return 0;
    }
    f->lanes = f->step;
    f->sum = f->step + 8 * blocks;
    f->step = f->sum + blocks;
    memset(f->q + K, 0, padded - K);
    f->finite = 1;
    for (int64_t b = 0; b < blocks; b++) {
        int64_t k0 = b * XBLOCK, k1 = k0 + XBLOCK < K ? k0 + XBLOCK : K;
        if (k0 >= K) {  // the padding's blocks: zeros
            f->step[b] = f->sum[b] = 0.0f;  // (their lanes are set below)
            continue;
        }
        __m512 v[2], top = _mm512_setzero_ps();
        __mmask16 m[2];
        for (int h = 0; h < 2; h++) {
            int64_t k = k0 + 16 * h, left = k1 - k;
            m[h] = first_lanes(left);
            v[h] = load_bf16x16(x + k, m[h]);
            __m512 a = _mm512_abs_ps(v[h]);
            if (_mm512_cmp_ps_mask(a, _mm512_set1_ps(INFINITY), _CMP_NLT_UQ)) f->finite = 0;  // infinite or NaN
            top = _mm512_max_ps(top, a);
        }
        float big = _mm512_reduce_max_ps(top);
        float step = big > 0.0f ? big / 127.0f : 0.0f;
        __m512 inv = _mm512_set1_ps(big > 0.0f ? 127.0f / big : 0.0f);
        __m512i total = _mm512_setzero_si512();
        for (int h = 0; h < 2; h++) {
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[h], inv));  // round to nearest even
            q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
            _mm_mask_storeu_epi8(f->q + k0 + 16 * h, m[h], _mm512_cvtepi32_epi8(q));
            total = _mm512_add_epi32(total, q);
        }
        f->step[b] = step;
        f->sum[b] = step * (float)_mm512_reduce_add_epi32(total);
    }
    for (int64_t b = 0; b < blocks; b++)
        for (int i = 0; i < 8; i++) f->lanes[8 * b + i] = f->step[b];
    return 1;
}

static void q8_x_free(q8_x *f) {
    free(f->q);
    free(f->lanes);
}

// The int8/int4 products and the attention return 0, or -1 where their scratch memory (a few KB to a few
// hundred KB) could not be allocated; the caller raises MemoryError.
#define OUT_OF_MEMORY (-1)

// The x the int8/int4 products compute with, as bf16 can hold it exactly only by chance: step * xq as
// fp32 (K floats), for the tests' reference.
int quantize_x8(const uint16_t *x, float *out, int64_t K) {
    q8_x f;
    if (!q8_x_make(&f, x, K)) return OUT_OF_MEMORY;
    for (int64_t k = 0; k < K; k++) out[k] = f.step[k / XBLOCK] * (float)f.q[k];
    if (!f.finite)
        for (int64_t k = 0; k < K; k++) out[k] = NAN;
    q8_x_free(&f);
    return 0;
}

// ---- int8 weights with one scale per row: y[n] = scale[n] * sum_k q[n, k] x[k] + bias[n] -------------
//
// Per 64 columns and row, one vpdpbusd gathers sum (q + 128) xq per block of 32 (lanes 0-7 and 8-15), which
// becomes fp32, times the blocks' steps; the + 128 adds 128 * sum(x) to every row, subtracted once at the end.

// One weight row at a time, also for wide rows (with 8-bit activations a row and x take 2 bytes per column; four
// weight rows per pass, as bf16 does for wide rows, measured slower on 10240-wide rows), times M (1 .. TILED_FROM - 1)
// rows of x, each load of the weights serving all of them; two chains of convert-and-fma per row of x, one for
// even and one for odd 64 columns. Masked loads only for a partial last 64 columns: masked on every load, 2 rows
// took 56 ms instead of 26 over 0.94 GB.
static inline __attribute__((always_inline)) void dot_int8(const int8_t *w, const q8_x *f, int64_t K, int M,
                                                           float *out) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 acc[TILED_FROM - 1], acc2[TILED_FROM - 1];
    for (int m = 0; m < M; m++) acc[m] = acc2[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {
        __m512i u0 = _mm512_xor_si512(_mm512_loadu_si512(w + k), flip);
        __m512i u1 = _mm512_xor_si512(_mm512_loadu_si512(w + k + 64), flip);
        for (int m = 0; m < M; m++) {
            __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u0, _mm512_load_si512(f[m].q + k));
            __m512i d1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u1, _mm512_load_si512(f[m].q + k + 64));
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_load_ps(f[m].lanes + k / 4), acc[m]);
            acc2[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_load_ps(f[m].lanes + k / 4 + 16), acc2[m]);
        }
    }
    for (; k < K; k += 64) {  // past K the weights load as 0 (128 after the flip) and meet zero activations
        __m512i u0 = _mm512_xor_si512(_mm512_maskz_loadu_epi8(first_bytes(K - k), w + k), flip);
        for (int m = 0; m < M; m++) {
            __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u0, _mm512_load_si512(f[m].q + k));
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_load_ps(f[m].lanes + k / 4), acc[m]);
        }
    }
    for (int m = 0; m < M; m++) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m], acc2[m]));
}

// 1 .. TILED_FROM - 1 rows of x (a decode step, of one sequence or a few), one weight row at a time
static int int8_row_by_row(const int8_t *w, const uint16_t *x, const uint16_t *scales, const uint16_t *bias,
                           uint16_t *y, int64_t N, int64_t K, int64_t M) {
    q8_x f[TILED_FROM - 1];
    float offset[TILED_FROM - 1];
    int64_t made = 0;
    for (; made < M; made++) {
        if (!q8_x_make(&f[made], x + made * K, K)) break;
        offset[made] = 0.0f;
        for (int64_t b = 0; b * XBLOCK < K; b++) offset[made] += 128.0f * f[made].sum[b];
    }
    if (made == M) {
#pragma omp parallel for schedule(dynamic, chunk_of(K))
        for (int64_t n = 0; n < N; n++) {
            float out[TILED_FROM - 1];
            switch (M) {  // a copy per count of rows, the accumulators in registers
                case 1: dot_int8(w + n * K, f, K, 1, out); break;
                case 2: dot_int8(w + n * K, f, K, 2, out); break;
                case 3: dot_int8(w + n * K, f, K, 3, out); break;
                default: dot_int8(w + n * K, f, K, 4, out); break;
            }
            for (int64_t m = 0; m < M; m++)
                y[m * N + n] = f[m].finite ? f32_to_bf16((out[m] - offset[m]) * bf16_to_f32(scales[n]) + bias_at(bias, n))
                                           : 0x7FC0;
        }
    }
    for (int64_t m = 0; m < made; m++) q8_x_free(&f[m]);
    return made == M ? 0 : OUT_OF_MEMORY;
}

#if TILED_FROM != 5
#error "int8_row_by_row has a case for each count of rows below TILED_FROM"
#endif

// ---- int4 weights in PyTorch's CPU layout (aten._convert_weight_to_int4pack_for_cpu, AVX-512 build) ------
//
// Rows come in blocks of 64; for each column k a block stores 32 bytes, byte j holding row j in its low
// nibble and row j + 32 in its high one. The weight is symmetric, W[n, k] = (q - 8) * scale (as llama.cpp's
// q4_0: 4.5 bits a weight with groups of 32), the bf16 scales stored block by block as the kernel reads them,
// (N / 64, K / group, 64) (lit_gpt/quantize.py keeps them so: PyTorch's (K / group, N, 2) pairs of scale and
// zero put a block's scales N * 4 bytes apart, one stream per group, and decode ran 8-13% slower reading them
// there, even with each block's scales prefetched a block ahead). vpdpbusd needs each row's four consecutive
// columns in one 32-bit lane: one byte permute over the 128 bytes of four columns gathers them for 16 rows (32
// with both nibbles).
// Per group g of columns (a whole number of activation blocks b, each with its step s_b and sum X_b):
//   sum_{k in g} W x = scale * (sum_b s_b sum_{k in b} q xq - 8 sum_b X_b).

#define INT4_BLOCK 64
// The weights are asked for this many bytes ahead of their use (past a block's end: the next block's start):
// 5-7% faster decode products than the hardware prefetcher alone (1024-4096 bytes all gained; bf16 and
// int8, with less arithmetic per byte, gained nothing)
#define INT4_AHEAD 2048

// The byte permute over four columns of a block (128 bytes): byte 4 j + m of its output is byte j of column k + m,
// for the first 16 rows (with [1]: the next 16); the low nibbles hold those rows, the high ones rows 32 on.
static const uint8_t int4_gather[2][64] = {
#define G(j, o) (j) + (o), 32 + (j) + (o), 64 + (j) + (o), 96 + (j) + (o)
#define G16(o) G(0, o), G(1, o), G(2, o), G(3, o), G(4, o), G(5, o), G(6, o), G(7, o), G(8, o), G(9, o), G(10, o), \
        G(11, o), G(12, o), G(13, o), G(14, o), G(15, o)
    {G16(0)}, {G16(16)}};
#undef G16
#undef G

// one block of 64 rows: out[r] = sum_k W[r, k] x[k]; scales: the block's, (K / group, 64)
static void block_int4(const uint8_t *w, const uint16_t *scales, const q8_x *f, int64_t K, int64_t group,
                       float *out) {
    const __m512i first = _mm512_loadu_si512(int4_gather[0]), second = _mm512_loadu_si512(int4_gather[1]);
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    const uint32_t *xq = (const uint32_t *)f->q;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t g = 0; g < K / group; g++) {
        __m512 dot[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        float x_sum = 0.0f;
        for (int64_t b = g * group / XBLOCK; b < (g + 1) * group / XBLOCK; b++) {
            __m512i d[4], e[4];  // rows 0..15, 16..31, 32..47, 48..63; two chains each (even/odd steps)
            for (int i = 0; i < 4; i++) d[i] = e[i] = _mm512_setzero_si512();
            for (int64_t k = b * XBLOCK; k < (b + 1) * XBLOCK; k += 8) {
                for (int p = 0; p < 4; p++) _mm_prefetch((const char *)(w + k * 32) + INT4_AHEAD + 64 * p, _MM_HINT_T0);
                __m512i c01 = _mm512_loadu_si512(w + k * 32), c23 = _mm512_loadu_si512(w + k * 32 + 64);
                __m512i a = _mm512_permutex2var_epi8(c01, first, c23), bb = _mm512_permutex2var_epi8(c01, second, c23);
                __m512i xv = _mm512_set1_epi32((int)xq[k / 4]);
                d[0] = _mm512_dpbusd_epi32(d[0], _mm512_and_si512(a, nibble), xv);
                d[1] = _mm512_dpbusd_epi32(d[1], _mm512_and_si512(bb, nibble), xv);
                d[2] = _mm512_dpbusd_epi32(d[2], _mm512_and_si512(_mm512_srli_epi16(a, 4), nibble), xv);
                d[3] = _mm512_dpbusd_epi32(d[3], _mm512_and_si512(_mm512_srli_epi16(bb, 4), nibble), xv);
                __m512i c45 = _mm512_loadu_si512(w + k * 32 + 128), c67 = _mm512_loadu_si512(w + k * 32 + 192);
                __m512i a2 = _mm512_permutex2var_epi8(c45, first, c67), b2 = _mm512_permutex2var_epi8(c45, second, c67);
                __m512i xv2 = _mm512_set1_epi32((int)xq[k / 4 + 1]);
                e[0] = _mm512_dpbusd_epi32(e[0], _mm512_and_si512(a2, nibble), xv2);
                e[1] = _mm512_dpbusd_epi32(e[1], _mm512_and_si512(b2, nibble), xv2);
                e[2] = _mm512_dpbusd_epi32(e[2], _mm512_and_si512(_mm512_srli_epi16(a2, 4), nibble), xv2);
                e[3] = _mm512_dpbusd_epi32(e[3], _mm512_and_si512(_mm512_srli_epi16(b2, 4), nibble), xv2);
            }
            for (int i = 0; i < 4; i++) d[i] = _mm512_add_epi32(d[i], e[i]);
            __m512 step = _mm512_set1_ps(f->step[b]);
            for (int i = 0; i < 4; i++) dot[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[i]), step, dot[i]);
            x_sum += f->sum[b];
        }
        __m512 xs = _mm512_set1_ps(x_sum), eight = _mm512_set1_ps(8.0f);
        const uint16_t *s = scales + g * INT4_BLOCK;  // this group's scales of the block's rows
        for (int i = 0; i < 4; i++)
            acc[i] = _mm512_fmadd_ps(load_bf16x16(s + 16 * i, 0xFFFF), _mm512_fnmadd_ps(eight, xs, dot[i]), acc[i]);
    }
    for (int i = 0; i < 4; i++) _mm512_storeu_ps(out + 16 * i, acc[i]);
}

// The rows of x one at a time, each through block_int4, a block of weights (64 rows: 80 KB at K = 2560) read from
// memory once and from the L2 cache for the other rows: for 1 to TILED_FROM - 1 rows (a decode step), where
// reading the weights sets the speed.
static int int4_row_by_row(const uint8_t *w, const uint16_t *x, const uint16_t *scales, const uint16_t *bias,
                           uint16_t *y, int64_t N, int64_t n_out, int64_t K, int64_t group, int64_t M) {
    q8_x f[TILED_FROM - 1];
    int64_t made = 0;
    for (; made < M; made++)
        if (!q8_x_make(&f[made], x + made * K, K)) break;
    int64_t blocks = N / INT4_BLOCK;
    if (made == M) {
#pragma omp parallel for schedule(dynamic, chunk_of(INT4_BLOCK * K / 2))
        for (int64_t b = 0; b < blocks; b++) {
            for (int64_t m = 0; m < M; m++) {
                float out[INT4_BLOCK];
                block_int4(w + b * INT4_BLOCK * K / 2, scales + b * INT4_BLOCK * (K / group), &f[m], K, group, out);
                for (int r = 0; r < INT4_BLOCK; r++) {
                    int64_t n = b * INT4_BLOCK + r;
                    if (n < n_out) y[m * n_out + n] = f[m].finite ? f32_to_bf16(out[r] + bias_at(bias, n)) : 0x7FC0;
                }
            }
        }
    }
    for (int64_t m = 0; m < made; m++) q8_x_free(&f[m]);
    return made == M ? 0 : OUT_OF_MEMORY;
}

// ---- int8 and int4 weights times several rows (a prompt's prefill, a decode step of a batch) --------------
//
// With more rows, work repeated for every row (int4's unpacking of the nibbles, int8's convert-and-fma per 64
// columns) sets the speed, not the weights' reading. So a thread turns each block of 64 weight rows once into a
// scratch of signed bytes (int8: q; int4: q - 8), each 32-bit lane holding one row's four consecutive columns
// (64 K bytes: it stays in the L2 cache), and multiplies tiles of x's rows by it. x enters vpdpbusd as the
// unsigned operand, xq + 128, which adds 128 sum(q) over each block of 32 columns to a row's sum: the
// accumulators start from that sum negated, so they hold sum q xq exactly. A tile is TILE_GROUPS x 16 weight rows
// by TILE_ROWS rows of x, its int32 sums and fp32 accumulators in registers (2 x 5 measured fastest of 1-4
// groups by 2-12 rows).
#define TILE_GROUPS 2
#define TILE_ROWS 5
// unpack_int8 reads 16 rows side by side and asks for each this many bytes ahead (the hardware prefetcher follows
// so many streams late): 2-row int8 products over 0.94 GB of weights 45 -> 36 ms
#define INT8_AHEAD 1024

typedef struct {
    int8_t *w;          // per 4 columns, 4 vectors (row groups of 16 rows), 64 bytes each: 64 Kx bytes
    int32_t *start;     // per block of 32 columns, the 4 row groups' vectors: -128 sum(q)
    uint16_t scale[64]; // int8: the block's scales (0 past the last row); int4's are read where they lie
} unpacked;

// the accumulators' starts, from the unpacked weights (Kx / 32 blocks of 32 columns)
static void unpacked_starts(unpacked *u, int64_t Kx) {
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t b = 0; b < Kx / XBLOCK; b++)
        for (int i = 0; i < 4; i++) {
            __m512i sum = _mm512_setzero_si512();
            for (int64_t k = b * XBLOCK; k < (b + 1) * XBLOCK; k += 4)
                sum = _mm512_dpbusd_epi32(sum, ones, _mm512_load_si512(u->w + k * 64 + 64 * i));
            _mm512_store_si512(u->start + b * 64 + 16 * i, _mm512_mullo_epi32(sum, _mm512_set1_epi32(-128)));
        }
}

// rows n0 .. n0 + 63 of an int8 weight (N, K), rows past N as zeros, columns K .. Kx - 1 as zeros (Kx: K rounded up
// to 64): per 16 rows and 64 columns, a transpose of 16 x 16 32-bit lanes
static void unpack_int8(const int8_t *w, const uint16_t *scales, int64_t N, int64_t K, int64_t Kx, int64_t n0,
                        unpacked *u) {
    for (int i = 0; i < 4; i++)
        for (int64_t k0 = 0; k0 < Kx; k0 += 64) {
            __mmask64 cols = first_bytes(K - k0);
            __m512i r[16], t[16], v[16];
            for (int j = 0; j < 16; j++) {
                int64_t n = n0 + 16 * i + j;
                r[j] = n < N ? _mm512_maskz_loadu_epi8(cols, w + n * K + k0) : _mm512_setzero_si512();
                _mm_prefetch((const char *)(w + n * K + k0) + INT8_AHEAD, _MM_HINT_T0);
            }
            for (int j = 0; j < 16; j += 2) {  // within each 128-bit lane: pairs of rows, then fours
                t[j] = _mm512_unpacklo_epi32(r[j], r[j + 1]);
                t[j + 1] = _mm512_unpackhi_epi32(r[j], r[j + 1]);
            }
            for (int j = 0; j < 16; j += 4) {  // v[j + e], lane L: rows j .. j + 3 of dword 4 L + e
                v[j] = _mm512_unpacklo_epi64(t[j], t[j + 2]);
                v[j + 1] = _mm512_unpackhi_epi64(t[j], t[j + 2]);
                v[j + 2] = _mm512_unpacklo_epi64(t[j + 1], t[j + 3]);
                v[j + 3] = _mm512_unpackhi_epi64(t[j + 1], t[j + 3]);
            }
            for (int e = 0; e < 4; e++) {  // across the 128-bit lanes: dword 4 L + e of the 16 rows
                __m512i p0 = _mm512_shuffle_i32x4(v[e], v[4 + e], 0x44), p1 = _mm512_shuffle_i32x4(v[e], v[4 + e], 0xEE);
                __m512i q0 = _mm512_shuffle_i32x4(v[8 + e], v[12 + e], 0x44);
                __m512i q1 = _mm512_shuffle_i32x4(v[8 + e], v[12 + e], 0xEE);
                int8_t *out = u->w + k0 * 64 + 64 * i;  // (the vector of dword c lies at out + 256 c)
                _mm512_store_si512(out + 256 * e, _mm512_shuffle_i32x4(p0, q0, 0x88));
                _mm512_store_si512(out + 256 * (4 + e), _mm512_shuffle_i32x4(p0, q0, 0xDD));
                _mm512_store_si512(out + 256 * (8 + e), _mm512_shuffle_i32x4(p1, q1, 0x88));
                _mm512_store_si512(out + 256 * (12 + e), _mm512_shuffle_i32x4(p1, q1, 0xDD));
            }
        }
    for (int j = 0; j < 64; j++) u->scale[j] = n0 + j < N ? scales[n0 + j] : 0;
    unpacked_starts(u, Kx);
}

// one 64-row block of an int4 weight in PyTorch's CPU layout (see block_int4)
static void unpack_int4(const uint8_t *w, int64_t K, unpacked *u) {
    const __m512i first = _mm512_loadu_si512(int4_gather[0]), second = _mm512_loadu_si512(int4_gather[1]);
    const __m512i nibble = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
    for (int64_t k = 0; k < K; k += 4) {
        _mm_prefetch((const char *)(w + k * 32) + INT4_AHEAD, _MM_HINT_T0);
        _mm_prefetch((const char *)(w + k * 32) + INT4_AHEAD + 64, _MM_HINT_T0);
        __m512i c01 = _mm512_loadu_si512(w + k * 32), c23 = _mm512_loadu_si512(w + k * 32 + 64);
        __m512i a = _mm512_permutex2var_epi8(c01, first, c23), bb = _mm512_permutex2var_epi8(c01, second, c23);
        __m512i v[4] = {_mm512_and_si512(a, nibble), _mm512_and_si512(bb, nibble),
                        _mm512_and_si512(_mm512_srli_epi16(a, 4), nibble),
                        _mm512_and_si512(_mm512_srli_epi16(bb, 4), nibble)};
        for (int i = 0; i < 4; i++) _mm512_store_si512(u->w + k * 64 + 64 * i, _mm512_sub_epi8(v[i], eight));
    }
    unpacked_starts(u, K);
}

// R <= TILE_ROWS rows of x (xu: xq + 128, Kx bytes a row; steps: Kx / 32 a row) times row groups i0 ..
// i0 + TILE_GROUPS - 1 of an unpacked block (scales (Kx / group, 64): the block's, one row of them for int8 with
// group = Kx). out[g R + r], lane l: the sum of block row 16 (i0 + g) + l with x's row r, before the bias.
static inline __attribute__((always_inline)) void tile(const unpacked *u, const uint16_t *scales, const uint8_t *xu,
                                                       const float *steps, int64_t Kx, int64_t group, int i0, int R,
                                                       __m512 *out) {
    __m512 acc[TILE_GROUPS * TILE_ROWS];
    for (int j = 0; j < TILE_GROUPS * R; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < Kx / XBLOCK; b++) {
        __m512i d[TILE_GROUPS * TILE_ROWS];
        for (int g = 0; g < TILE_GROUPS; g++) {
            __m512i start = _mm512_load_si512(u->start + b * 64 + 16 * (i0 + g));
            for (int r = 0; r < R; r++) d[g * R + r] = start;
        }
#pragma GCC unroll 8
        for (int64_t k = b * XBLOCK; k < (b + 1) * XBLOCK; k += 4) {
            __m512i wv[TILE_GROUPS];
            for (int g = 0; g < TILE_GROUPS; g++) wv[g] = _mm512_load_si512(u->w + k * 64 + 64 * (i0 + g));
            for (int r = 0; r < R; r++) {
                __m512i xv = _mm512_set1_epi32(*(const int32_t *)(xu + r * Kx + k));
                for (int g = 0; g < TILE_GROUPS; g++) d[g * R + r] = _mm512_dpbusd_epi32(d[g * R + r], xv, wv[g]);
            }
        }
        const uint16_t *s = scales + b * XBLOCK / group * 64;
        for (int g = 0; g < TILE_GROUPS; g++) {
            __m512 scale = load_bf16x16(s + 16 * (i0 + g), 0xFFFF);
            for (int r = 0; r < R; r++) {
                __m512 f = _mm512_mul_ps(scale, _mm512_set1_ps(steps[r * (Kx / XBLOCK) + b]));
                acc[g * R + r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[g * R + r]), f, acc[g * R + r]);
            }
        }
    }
    for (int j = 0; j < TILE_GROUPS * R; j++) out[j] = acc[j];
}

static void tile_of_rows(const unpacked *u, const uint16_t *scales, const uint8_t *xu, const float *steps,
                         int64_t Kx, int64_t group, int i0, int R, __m512 *out) {
    switch (R) {  // a copy per count of rows, its loops unrolled and its accumulators in registers
        case 1: tile(u, scales, xu, steps, Kx, group, i0, 1, out); break;
        case 2: tile(u, scales, xu, steps, Kx, group, i0, 2, out); break;
        case 3: tile(u, scales, xu, steps, Kx, group, i0, 3, out); break;
        case 4: tile(u, scales, xu, steps, Kx, group, i0, 4, out); break;
        default: tile(u, scales, xu, steps, Kx, group, i0, TILE_ROWS, out); break;
    }
}
#if TILE_ROWS != 5
#error "tile_of_rows needs a case for each count of rows below TILE_ROWS"
#endif

// y (M, n_out) = x (M, K) W^T + bias for an int8 weight (int4 = 0: (N, K), one scale per row, n_out = N) or an
// int4 one (int4 = 1: PyTorch's CPU layout, N a multiple of 64, scales block by block, groups of `group`)
static int tiled_product(int int4, const void *w, const uint16_t *x, const uint16_t *scales, const uint16_t *bias,
                         uint16_t *y, int64_t N, int64_t n_out, int64_t K, int64_t group, int64_t M) {
    int64_t Kx = int4 ? K : (K + 63) / 64 * 64, xblocks = Kx / XBLOCK;  // (int4's K: a multiple of 32)
    uint8_t *xu = aligned_alloc(64, (M * Kx + 63) / 64 * 64);
    float *steps = malloc(M * xblocks * sizeof(float));
    uint8_t *finite = malloc(M);
    int status = xu && steps && finite ? 0 : OUT_OF_MEMORY;
    if (status == 0) {
#pragma omp parallel for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            q8_x f;  // its q: K rounded up to 64, zeros past K
            if (!q8_x_make(&f, x + m * K, K)) {
#pragma omp atomic write
                status = OUT_OF_MEMORY;
                continue;
            }
            for (int64_t k = 0; k < Kx; k += 64) {  // (int4's Kx: a multiple of 32 only)
                __m512i q = _mm512_xor_si512(_mm512_load_si512(f.q + k), _mm512_set1_epi8((char)0x80));
                _mm512_mask_storeu_epi8(xu + m * Kx + k, first_bytes(Kx - k), q);
            }
            memcpy(steps + m * xblocks, f.step, xblocks * sizeof(float));
            finite[m] = (uint8_t)f.finite;
            q8_x_free(&f);
        }
    }
    if (status == 0) {
#pragma omp parallel
        {
            unpacked *u = malloc(sizeof(unpacked));
            if (u) {
                u->w = aligned_alloc(64, 64 * Kx);
                u->start = aligned_alloc(64, xblocks * 64 * sizeof(int32_t));
            }
            int ok = u && u->w && u->start;
            if (!ok) {
#pragma omp atomic write
                status = OUT_OF_MEMORY;
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t nb = 0; nb < (N + 63) / 64; nb++) {
                if (!ok) continue;
                const uint16_t *block_scales = u->scale;
                int64_t block_group = Kx;
                if (int4) {
                    unpack_int4((const uint8_t *)w + nb * 64 * K / 2, K, u);
                    block_scales = scales + nb * 64 * (K / group);
                    block_group = group;
                } else {
                    unpack_int8((const int8_t *)w, scales, N, K, Kx, nb * 64, u);
                }
                for (int i0 = 0; i0 < 4; i0 += TILE_GROUPS)
                    for (int64_t m0 = 0; m0 < M; m0 += TILE_ROWS) {
                        int R = M - m0 < TILE_ROWS ? (int)(M - m0) : TILE_ROWS;
                        __m512 out[TILE_GROUPS * TILE_ROWS];
                        tile_of_rows(u, block_scales, xu + m0 * Kx, steps + m0 * xblocks, Kx, block_group, i0, R, out);
                        for (int g = 0; g < TILE_GROUPS; g++)
                            for (int r = 0; r < R; r++) {
                                float v[16];
                                _mm512_storeu_ps(v, out[g * R + r]);
                                int64_t m = m0 + r, n0 = nb * 64 + 16 * (i0 + g);
                                for (int l = 0; l < 16 && n0 + l < n_out; l++)
                                    y[m * n_out + n0 + l] = finite[m] ? f32_to_bf16(v[l] + bias_at(bias, n0 + l)) : 0x7FC0;
                            }
                    }
            }
            if (u) {
                free(u->w);
                free(u->start);
            }
            free(u);
        }
    }
    free(xu);
    free(steps);
    free(finite);
    return status;
}

// y (M, N) = x (M, K) W^T + bias for an int8 weight (N, K) with one scale per row, any M >= 1
int gemv_int8(const int8_t *w, const uint16_t *x, const uint16_t *scales, const uint16_t *bias, uint16_t *y,
              int64_t N, int64_t K, int64_t M) {
    if (M >= TILED_FROM) return tiled_product(0, w, x, scales, bias, y, N, N, K, K, M);
    return int8_row_by_row(w, x, scales, bias, y, N, K, M);
}

// y (M, n_out) = x (M, K) W^T + bias for an int4 weight, any M >= 1 (a decode step, of one sequence or of a batch;
// a prompt). N: rows as stored (a multiple of 64); the first n_out rows are written. K: a multiple of group, group
// a multiple of 32 (PyTorch's packing allows 32, 64, 128, 256). A row of x holding an infinity or NaN gives a row
// of NaN, as a float product would.
int gemv_int4(const uint8_t *w, const uint16_t *x, const uint16_t *scales, const uint16_t *bias,
              uint16_t *y, int64_t N, int64_t n_out, int64_t K, int64_t group, int64_t M) {
    if (M >= TILED_FROM) return tiled_product(1, w, x, scales, bias, y, N, n_out, K, group, M);
    return int4_row_by_row(w, x, scales, bias, y, N, n_out, K, group, M);
}

// ---- attention of one new token over the cached keys and values -----------------------------------------
//
// PyTorch's CPU flash attention is built for blocks of queries; for the single query of a decode step it
// measured 0.3 ms per layer at 128 cached positions and 6.8 ms at 2048 (more than reading the layer's
// weights). Here each (sequence, head) is one loop over the cache: scores in fp32, softmax, weighted sum
// of the values, reading keys and values once.

// The longest head attend_one takes (its query and accumulators stay in registers, 16 floats each). Set in one
// place, lit_gpt/gemv.py, which passes it to the compiler (-DMAX_HEAD_SIZE=...) and checks heads against it.
#ifndef MAX_HEAD_SIZE
#error "MAX_HEAD_SIZE is not set: lit_gpt/gemv.py builds this file with -DMAX_HEAD_SIZE=..."
#elif MAX_HEAD_SIZE % 16 != 0
#error "MAX_HEAD_SIZE must be a multiple of 16 (one AVX-512 register of floats)"
#endif

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

// After a layer's weights have streamed through the caches its keys and values come from memory, one short
// run per head, which the hardware prefetcher picks up late: they are asked for in software, this far ahead.
#define KV_AHEAD 4096

// One (sequence, head): softmax(q . k_l * scale) over l < L, times the values. q, y: hs; k, v: (L.., hs);
// s: room for L + 16 scores.
static void attend_head(const uint16_t *q, const uint16_t *kh, const uint16_t *vh, uint16_t *y, int64_t L, int64_t hs,
                        float scale, float *s) {
    int64_t chunks = (hs + 15) / 16;
    __mmask16 mask[MAX_HEAD_SIZE / 16];
    __m512 qf[MAX_HEAD_SIZE / 16], acc[MAX_HEAD_SIZE / 16];
    for (int64_t c = 0; c < chunks; c++) {
        int64_t left = hs - 16 * c;
        mask[c] = first_lanes(left);
        qf[c] = _mm512_mul_ps(load_bf16x16(q + 16 * c, mask[c]), _mm512_set1_ps(scale));
        acc[c] = _mm512_setzero_ps();
    }
    float top = -INFINITY;
    const char *kb = (const char *)kh, *vb = (const char *)vh;
    int64_t row = hs * 2, end = L * row;
    for (int64_t o = 0; o < KV_AHEAD && o < end; o += 64) _mm_prefetch(kb + o, _MM_HINT_T0);
    for (int64_t l = 0; l < L; l++) {
        // the keys KV_AHEAD bytes ahead, and this position's values (read after the softmax)
        for (int64_t o = l * row; o < (l + 1) * row + 63; o += 64) {
            if (o + KV_AHEAD < end) _mm_prefetch(kb + o + KV_AHEAD, _MM_HINT_T0);
            if (o < end) _mm_prefetch(vb + o, _MM_HINT_T0);
        }
        __m512 d = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; c++) d = _mm512_fmadd_ps(qf[c], load_bf16x16(kh + l * hs + 16 * c, mask[c]), d);
        s[l] = _mm512_reduce_add_ps(d);
        top = s[l] > top ? s[l] : top;
    }
    __m512 total = _mm512_setzero_ps();
    for (int64_t l = 0; l < L; l += 16) {
        __mmask16 m = first_lanes(L - l);
        __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + l), _mm512_set1_ps(top))));
        _mm512_mask_storeu_ps(s + l, m, e);
        total = _mm512_add_ps(total, e);
    }
    for (int64_t l = 0; l < L; l++) {
        __m512 p = _mm512_set1_ps(s[l]);
        for (int64_t c = 0; c < chunks; c++) acc[c] = _mm512_fmadd_ps(p, load_bf16x16(vh + l * hs + 16 * c, mask[c]), acc[c]);
    }
    float inv = 1.0f / _mm512_reduce_add_ps(total), out[16];
    for (int64_t c = 0; c < chunks; c++) {
        _mm512_storeu_ps(out, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
        for (int64_t i = 0; i < 16 && 16 * c + i < hs; i++) y[16 * c + i] = f32_to_bf16(out[i]);
    }
}

// The positions a query at position p sees: start .. p, start = 0, or with a sliding window (window > 0) the
// first of the last `window` positions.
static inline int64_t window_start(int64_t p, int64_t window) {
    return window > 0 && p + 1 > window ? p + 1 - window : 0;
}

// q: (B, n_head, hs); k, v: (B, n_groups, S, hs); y: (B, n_head, hs). Sequence b's query sits at position
// pos[b] (per_row) or pos[0] (every sequence at the same one) and attends to the cached positions up to it.
// Query heads share key/value heads in consecutive runs of n_head / n_groups (grouped-query attention).
static int attend_rows(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *y, int64_t B,
                       int64_t n_head, int64_t n_groups, int64_t S, const int64_t *pos, int per_row, int64_t window,
                       int64_t hs, float scale) {
    int64_t q_per_kv = n_head / n_groups, longest = 0;
    for (int64_t b = 0; b < (per_row ? B : 1); b++) longest = pos[b] + 1 > longest ? pos[b] + 1 : longest;
    int failed = 0;
#pragma omp parallel
    {
        float *s = malloc((longest + 16) * sizeof(float));  // each thread's scores, for all its heads
        if (!s) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * n_head; bh++) {
            int64_t p = pos[per_row ? bh / n_head : 0], start = window_start(p, window);
            int64_t kv = (bh / q_per_kv * S + start) * hs;  // (sequence, key/value head) bh / q_per_kv
            if (s) attend_head(q + bh * hs, k + kv, v + kv, y + bh * hs, p + 1 - start, hs, scale, s);
        }
        free(s);
    }
    return failed ? OUT_OF_MEMORY : 0;
}

// every sequence's query at position pos (already checked to lie in the cache)
int attend_one(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *y, int64_t B, int64_t n_head,
               int64_t n_groups, int64_t S, int64_t pos, int64_t window, int64_t hs, float scale) {
    return attend_rows(q, k, v, y, B, n_head, n_groups, S, &pos, 0, window, hs, scale);
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

#define OUT_OF_CACHE (-2)

// qkv: (B, n_groups, q_per_kv + 2, hs), each group's query heads, then its key and value (the model's fused
// layout); sequence b's new token sits at position pos[b] (per_row; else pos[0] for all), its cos and sin in row
// b (else row 0) of cos, sin (n_elem floats a row); k, v: the cache (B, n_groups, S, hs), written there;
// y: (B, n_head, hs). OUT_OF_CACHE, with nothing written, where a position lies outside the cache.
int attend_decode(const uint16_t *qkv, const float *cos, const float *sin, uint16_t *k, uint16_t *v, uint16_t *y,
                  int64_t B, int64_t n_head, int64_t n_groups, int64_t S, const int64_t *pos, int64_t per_row,
                  int64_t window, int64_t hs, int64_t n_elem, float scale) {
    for (int64_t b = 0; b < (per_row ? B : 1); b++)
        if (pos[b] < 0 || pos[b] >= S) return OUT_OF_CACHE;
    int64_t q_per_kv = n_head / n_groups, stride = (q_per_kv + 2) * hs;
    uint16_t *q = malloc(B * n_head * hs * sizeof(uint16_t));  // the rotated queries, (B, n_head, hs)
    if (!q) return OUT_OF_MEMORY;
    for (int64_t bg = 0; bg < B * n_groups; bg++) {
        int64_t b = per_row ? bg / n_groups : 0, at = (bg * S + pos[b]) * hs;
        const uint16_t *group = qkv + bg * stride;
        const float *c = cos + b * n_elem, *s = sin + b * n_elem;
        for (int64_t h = 0; h < q_per_kv; h++)
            rope_bf16(group + h * hs, c, s, q + (bg * q_per_kv + h) * hs, hs, n_elem);
        rope_bf16(group + q_per_kv * hs, c, s, k + at, hs, n_elem);
        memcpy(v + at, group + (q_per_kv + 1) * hs, hs * sizeof(uint16_t));
    }
    int status = attend_rows(q, k, v, y, B, n_head, n_groups, S, pos, (int)per_row, window, hs, scale);
    free(q);
    return status;
}

// ---- the MLP's activation between two decode products ------------------------------------------------------
//
// For a decode step's single row PyTorch's bf16 GELU is slow next to one vectorized pass. GELU with the tanh
// approximation, 0.5 x (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3), is
// x * sigmoid(2 u), computed so in fp32 and rounded to bf16: equal to F.gelu(x, approximate="tanh") for x above
// -2.9; below, where the results are under 0.004 in size, PyTorch's 1 + tanh(u) loses digits to cancellation
// and the two differ (from -6 to -2.9 this form is always the closer to the exact value). Subnormal results
// flush to zero, as vcvtneps2bf16 rounds.

// y[i] = GELU(x[i]) for n bf16 values (y may be x)
void gelu_tanh(const uint16_t *x, uint16_t *y, int64_t n) {
    const __m512 beta2 = _mm512_set1_ps(2.0f * 0.7978845608028654f), kappa = _mm512_set1_ps(0.044715f);
    // (e^-104 rounds to 0; a larger |z|, or an infinite one, would leave exp16's range)
    const __m512 one = _mm512_set1_ps(1.0f), limit = _mm512_set1_ps(104.0f);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = first_lanes(n - i);
        __m512 v = load_bf16x16(x + i, m);
        __m512 z = _mm512_mul_ps(beta2, _mm512_fmadd_ps(_mm512_mul_ps(kappa, v), _mm512_mul_ps(v, v), v));
        // sigmoid(z) from t = e^-|z| <= 1: 1 / (1 + t) for z >= 0, t / (1 + t) below (NaN in, NaN out; as in
        // PyTorch, GELU(-inf) is NaN: -inf times 0)
        __m512 t = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_min_ps(_mm512_abs_ps(z), limit)));
        __mmask16 negative = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
        __m512 sig = _mm512_div_ps(_mm512_mask_blend_ps(negative, one, t), _mm512_add_ps(one, t));
        _mm256_mask_storeu_epi16(y + i, m, f32x16_to_bf16(_mm512_mul_ps(v, sig)));
    }
}

// ---- SwiGLU's product of a decode step's few rows (the later family's MLP) ----------------------------------
//
// silu(gate) = gate / (1 + e^-gate) in fp32, rounded to bf16, then times up and rounded again: F.silu(gate) * up in
// bf16. Its exponential is exp16, not PyTorch's, so the two differ by one bf16 step on a few values; results that
// are subnormal floats flush to zero, as vcvtneps2bf16 rounds.

static inline __m512 bf16x16_rounded(__m512 v) {  // v rounded to bf16 and back to fp32
    return widen_bf16x16(f32x16_to_bf16(v));
}

// y (rows, n) = silu(gate) * up, from rows of [gate | up] (rows, 2n), the fused gate_up product
void silu_mul(const uint16_t *gate_up, uint16_t *y, int64_t rows, int64_t n) {
    // (e^-104 rounds to 0: past that the gate's sign alone decides)
    const __m512 one = _mm512_set1_ps(1.0f), limit = _mm512_set1_ps(104.0f);
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *gate = gate_up + 2 * r * n, *up = gate + n;
        for (int64_t i = 0; i < n; i += 16) {
            __mmask16 m = first_lanes(n - i);
            __m512 g = load_bf16x16(gate + i, m);
            // t = e^-|g| <= 1: gate / (1 + t) for gate >= 0, gate * t / (1 + t) below (= gate / (1 + e^-gate))
            __m512 t = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_min_ps(_mm512_abs_ps(g), limit)));
            __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
            __m512 silu = _mm512_div_ps(_mm512_mul_ps(g, _mm512_mask_blend_ps(negative, one, t)), _mm512_add_ps(one, t));
            __m512 product = _mm512_mul_ps(bf16x16_rounded(silu), load_bf16x16(up + i, m));
            _mm256_mask_storeu_epi16(y + r * n + i, m, f32x16_to_bf16(product));
        }
    }
}

// ---- layer norm of a decode step's few rows ----------------------------------------------------------------
//
// y = (x - mean) / sqrt(var + eps) * weight + bias for each row of n: the mean and variance summed in double,
// the rest in fp32 in PyTorch's order ((x * rstd + -mean * rstd) * weight + bias), rounded to bf16. F.layer_norm
// sums its fp32 moments otherwise, so the two differ by one bf16 step on a few values in a thousand.

static inline __m256 upper_half(__m512 v) {  // (AVX-512F: vextractf32x8 is AVX-512DQ's)
    return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}

void layer_norm(const uint16_t *x, const uint16_t *weight, const uint16_t *bias, uint16_t *y, int64_t rows,
                int64_t n, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * n;
        uint16_t *yr = y + r * n;
        __m512d sum = _mm512_setzero_pd();
        for (int64_t i = 0; i < n; i += 16) {
            __mmask16 m = first_lanes(n - i);
            __m512 v = load_bf16x16(xr + i, m);
            sum = _mm512_add_pd(sum, _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)),
                                                   _mm512_cvtps_pd(upper_half(v))));
        }
        double mean = _mm512_reduce_add_pd(sum) / (double)n;
        __m512d squares = _mm512_setzero_pd(), mean8 = _mm512_set1_pd(mean);
        for (int64_t i = 0; i < n; i += 16) {
            __mmask16 m = first_lanes(n - i);
            __m512 v = load_bf16x16(xr + i, m);
            __m512d lo = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)), mean8);
            __m512d hi = _mm512_sub_pd(_mm512_cvtps_pd(upper_half(v)), mean8);
            // (past n the zeros loaded count as -mean each: masked out)
            lo = _mm512_maskz_mov_pd((__mmask8)(m & 0xFF), lo);
            hi = _mm512_maskz_mov_pd((__mmask8)(m >> 8), hi);
            squares = _mm512_add_pd(squares, _mm512_add_pd(_mm512_mul_pd(lo, lo), _mm512_mul_pd(hi, hi)));
        }
        float rstd = 1.0f / sqrtf((float)(_mm512_reduce_add_pd(squares) / (double)n) + eps);
        __m512 scale = _mm512_set1_ps(rstd), shift = _mm512_set1_ps(-(float)mean * rstd);
        for (int64_t i = 0; i < n; i += 16) {
            __mmask16 m = first_lanes(n - i);
            __m512 v = _mm512_add_ps(_mm512_mul_ps(load_bf16x16(xr + i, m), scale), shift);
            v = _mm512_add_ps(_mm512_mul_ps(v, load_bf16x16(weight + i, m)), load_bf16x16(bias + i, m));
            _mm256_mask_storeu_epi16(yr + i, m, f32x16_to_bf16(v));
        }
    }
}

// ---- RMS norm of a decode step's few rows (the later family) ------------------------------------------------
//
// y = weight * bf16(x / sqrt(mean(x^2) + eps)) for each row of n: the mean summed in double, the rest in fp32, the
// normalized row rounded to bf16 before the weight multiplies it (as RMSNorm, and the checkpoints' Phi3RMSNorm, do
// in bf16). PyTorch sums its fp32 mean otherwise, so the two differ by one bf16 step on a few values.

void rms_norm(const uint16_t *x, const uint16_t *weight, uint16_t *y, int64_t rows, int64_t n, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * n;
        uint16_t *yr = y + r * n;
        __m512d squares = _mm512_setzero_pd();
        for (int64_t i = 0; i < n; i += 16) {  // (past n the lanes load as zeros, which add nothing)
            __m512 v = load_bf16x16(xr + i, first_lanes(n - i));
            __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v)), hi = _mm512_cvtps_pd(upper_half(v));
            squares = _mm512_add_pd(squares, _mm512_add_pd(_mm512_mul_pd(lo, lo), _mm512_mul_pd(hi, hi)));
        }
        __m512 rstd = _mm512_set1_ps(1.0f / sqrtf((float)(_mm512_reduce_add_pd(squares) / (double)n) + eps));
        for (int64_t i = 0; i < n; i += 16) {
            __mmask16 m = first_lanes(n - i);
            __m512 normalized = bf16x16_rounded(_mm512_mul_ps(load_bf16x16(xr + i, m), rstd));
            _mm256_mask_storeu_epi16(yr + i, m, f32x16_to_bf16(_mm512_mul_ps(load_bf16x16(weight + i, m), normalized)));
        }
    }
}

// ---- a decode step through all of a model's blocks, in one call -------------------------------------------
//
// Between the products of a decode step PyTorch's eager ops and the Python around them took ~5 ms per phi-2
// step (out of ~75-115), most of it after each layer's weights had pushed that code out of the caches; the
// memory sat idle meanwhile. Here every block's calls run from C, in the model's order, and give the same
// results as the separate calls (the same kernels, the same roundings): phi-1/1.5/2's parallel blocks, and the
// later family's sequential ones.

enum { BF16 = 0, INT8 = 1, INT4 = 2 };

// A weight matrix as the products above read it; all 8-byte fields (gemv.py passes them as int64s).
typedef struct {
    int64_t kind;  // BF16, INT8 or INT4
    const void *w;
    const uint16_t *scales;  // INT8: per row; INT4: block by block (see gemv_int4); BF16: unused
    const uint16_t *bias;    // or NULL
    int64_t n_out, K;
    int64_t rows;   // INT4: rows as stored (a multiple of 64)
    int64_t group;  // INT4: columns per scale
} matrix;

// y (M, n_out) = x (M, K) W^T + bias
static int product(const matrix *m, const uint16_t *x, uint16_t *y, int64_t M) {
    switch (m->kind) {
    case BF16:
        gemv_bf16(m->w, x, m->bias, y, m->n_out, m->K, M);
        return 0;
    case INT8:
        return gemv_int8(m->w, x, m->scales, m->bias, y, m->n_out, m->K, M);
    default:
        return gemv_int4(m->w, x, m->scales, m->bias, y, m->rows, m->n_out, m->K, m->group, M);
    }
}

// A block's scratch for B rows, one after the other: qkv, the heads' outputs, the attention's projection, fc's output,
// SwiGLU's product (sequential blocks) and the MLP's projection.
typedef struct {
    uint16_t *qkv, *heads, *a, *f, *g, *m;
} block_scratch;

static int64_t block_scratch_size(const matrix *mats, int64_t B, int64_t n_head, int64_t hs) {
    return B * (mats[0].n_out + n_head * hs + mats[1].n_out + mats[2].n_out + mats[2].n_out / 2 + mats[3].n_out);
}

static block_scratch block_scratch_at(uint16_t *p, const matrix *mats, int64_t B, int64_t n_head, int64_t hs) {
    block_scratch b;
    b.qkv = p;
    b.heads = b.qkv + B * mats[0].n_out;
    b.a = b.heads + B * n_head * hs;
    b.f = b.a + B * mats[1].n_out;
    b.g = b.f + B * mats[2].n_out;
    b.m = b.g + B * (mats[2].n_out / 2);
    return b;
}

// The attention's arguments, as attend_decode's (k and v: the block's cache rows of the step's sequences).
typedef struct {
    const float *cos, *sin;
    int64_t B, n_head, n_groups, S;
    const int64_t *pos;
    int64_t per_row, window, hs, n_elem;
    float scale;
} attention_args;

// b.a = proj(attention(qkv(h))) for B rows
static int attention_part(const matrix *mats, const uint16_t *h, block_scratch b, uint16_t *k, uint16_t *v,
                          const attention_args *t) {
    int status = product(&mats[0], h, b.qkv, t->B);
    if (!status) status = attend_decode(b.qkv, t->cos, t->sin, k, v, b.heads, t->B, t->n_head, t->n_groups, t->S,
                                        t->pos, t->per_row, t->window, t->hs, t->n_elem, t->scale);
    if (!status) status = product(&mats[1], b.heads, b.a, t->B);
    return status;
}

// out = x + proj(attention(qkv(h))) + mlp_proj(GELU(fc(h))) for B rows (phi-1, phi-1.5, phi-2), each sum rounded
// to bf16 as (x + a) + m is in PyTorch; h: the block's layer norm of x. mats: qkv, proj, fc, mlp_proj.
static int parallel_block(const matrix *mats, const uint16_t *x, const uint16_t *h, uint16_t *out, block_scratch b,
                          uint16_t *k, uint16_t *v, const attention_args *t) {
    int64_t B = t->B, C = mats[1].n_out;
    int status = attention_part(mats, h, b, k, v, t);
    if (!status) status = product(&mats[2], h, b.f, B);
    if (!status) {
        gelu_tanh(b.f, b.f, B * mats[2].n_out);
        status = product(&mats[3], b.f, b.m, B);
    }
    if (!status)
        for (int64_t i = 0; i < B * C; i++)
            out[i] = f32_to_bf16(bf16_to_f32(f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(b.a[i])))
                                 + bf16_to_f32(b.m[i]));
    return status;
}

// out = x1 + mlp_proj(silu(gate) * up) with x1 = x + proj(attention(qkv(h))) and [gate | up] = fc(rms_norm(x1)), for
// B rows (the later family's block), each sum rounded to bf16 as in PyTorch; h: the block's first RMS norm of x
// (overwritten). norm_2: the second RMS norm's weight.
static int sequential_block(const matrix *mats, const uint16_t *norm_2, float eps, const uint16_t *x, uint16_t *h,
                            uint16_t *out, block_scratch b, uint16_t *k, uint16_t *v, const attention_args *t) {
    int64_t B = t->B, C = mats[1].n_out, n_ff = mats[2].n_out / 2;
    int status = attention_part(mats, h, b, k, v, t);
    if (status) return status;
    for (int64_t i = 0; i < B * C; i++) b.a[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(b.a[i]));
    rms_norm(b.a, norm_2, h, B, C, eps);
    status = product(&mats[2], h, b.f, B);
    if (!status) {
        silu_mul(b.f, b.g, B, n_ff);
        status = product(&mats[3], b.g, b.m, B);
    }
    if (!status)
        for (int64_t i = 0; i < B * C; i++) out[i] = f32_to_bf16(bf16_to_f32(b.a[i]) + bf16_to_f32(b.m[i]));
    return status;
}

// A block as decode_blocks reads it; all 8-byte fields.
typedef struct {
    const uint16_t *norm_weight, *norm_bias;  // its (first) norm's, bf16: a layer norm's, or an RMS norm's (bias NULL)
    const uint16_t *norm_2_weight;            // a sequential block's second RMS norm's; a parallel block: NULL
    matrix mats[4];                           // qkv, proj, fc, mlp_proj
    uint16_t *k, *v;                          // its whole cache, (rows, n_groups, S, hs)
} decode_layer;

// A decode step through n_layer blocks, parallel (layer norm, then parallel_block) or sequential (RMS norm, then
// sequential_block), each norm with eps; from x (B, n_embd) to out; the step's sequences in cache rows first ..
// first + B - 1; the attention's other arguments as attend_decode's. OUT_OF_CACHE (from the first block, before
// anything is written) or OUT_OF_MEMORY.
int decode_blocks(const decode_layer *layers, int64_t n_layer, int64_t sequential, float eps, const uint16_t *x,
                  uint16_t *out, const float *cos, const float *sin, int64_t first, int64_t B, int64_t n_head,
                  int64_t n_groups, int64_t S, const int64_t *pos, int64_t per_row, int64_t window, int64_t hs,
                  int64_t n_elem, float scale) {
    // every block has the first's shapes (gemv.py checks them): one scratch serves the whole step
    const matrix *mats = layers[0].mats;
    int64_t C = mats[1].n_out, row = n_groups * S * hs;
    uint16_t *h = malloc((3 * B * C + block_scratch_size(mats, B, n_head, hs)) * sizeof(uint16_t));
    if (!h) return OUT_OF_MEMORY;
    uint16_t *between[2] = {h + B * C, h + 2 * B * C};
    block_scratch b = block_scratch_at(h + 3 * B * C, mats, B, n_head, hs);
    attention_args t = {cos, sin, B, n_head, n_groups, S, pos, per_row, window, hs, n_elem, scale};
    const uint16_t *in = x;
    int status = 0;
    for (int64_t l = 0; l < n_layer && !status; l++) {
        const decode_layer *layer = &layers[l];
        uint16_t *next = l == n_layer - 1 ? out : between[l % 2], *k = layer->k + first * row, *v = layer->v + first * row;
        if (sequential) {
            rms_norm(in, layer->norm_weight, h, B, C, eps);
            status = sequential_block(layer->mats, layer->norm_2_weight, eps, in, h, next, b, k, v, &t);
        } else {
            layer_norm(in, layer->norm_weight, layer->norm_bias, h, B, C, eps);
            status = parallel_block(layer->mats, in, h, next, b, k, v, &t);
        }
        in = next;
    }
    free(h);
    return status;
}
