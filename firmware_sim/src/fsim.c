/*
 * fsim runtime: arena, model.bin loader, arena planner and the layer pipeline.
 * See include/fsim.h for the contract. No malloc, no globals, C99.
 *
 * A layer runs in strips of output rows, and each strip in blocks of KC rows of K = in_c*9:
 * an im2col block (KC rows of R*w columns, padded to whole panels of NR) times the matching
 * columns of the weights (out_c x K) in a register-blocked GEMM (MR x NR tiles), partial
 * sums kept in the output, bias and ReLU with the last block. Blocking K keeps the im2col
 * scratch small, so the same RAM holds longer strips and the weights are read fewer times. A pooling layer computes R = 2 conv rows at a time and
 * pools them straight into its output row, so the full-size conv output never exists;
 * the exit layer accumulates its patch energies row by row the same way (patches on adaptive
 * average pooling's boundaries, so P need not divide the map).
 */
#include "fsim.h"

#include <math.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#define MR FSIM_TILE /* GEMM tile: output channels (the weights come packed in such tiles) */
#define NR 16u  /* GEMM tile: output positions (one im2col panel) */
#define KC 256u /* GEMM block of K: a panel block of KC x NR floats (16 KB) stays in L1 */
#define RMS_EPS 1e-12f
#define HEADER_WORDS 9u
#define LAYER_WORDS 5u

/* Weight tiles of MR output channels for m channels. */
static uint32_t tiles(uint32_t m) { return (m + MR - 1u) / MR; }

/* Rows of K per GEMM block: K split into equal blocks of at most KC, since a short last
 * block would pay a whole pass over the output tiles for little work. */
static uint32_t k_block(uint32_t k)
{
    uint32_t blocks = (k + KC - 1u) / KC;
    return (k + blocks - 1u) / blocks;
}

/* n output positions padded to whole im2col panels of NR columns. */
static uint32_t panel_cols(uint32_t n) { return (n + NR - 1u) / NR * NR; }

/* ------------------------------------------------------------------ arena */

void fsim_arena_init(fsim_arena *arena, void *buf, size_t size)
{
    arena->base = (unsigned char *)buf;
    arena->size = size;
    arena->used = 0;
}

static size_t align_up(size_t n) { return (n + FSIM_ALIGN - 1u) & ~(size_t)(FSIM_ALIGN - 1u); }

void *fsim_arena_alloc(fsim_arena *arena, size_t bytes)
{
    uintptr_t base = (uintptr_t)arena->base;
    uintptr_t start = (base + arena->used + FSIM_ALIGN - 1u) & ~(uintptr_t)(FSIM_ALIGN - 1u);
    size_t offset = (size_t)(start - base);
    if (offset > arena->size || bytes > arena->size - offset) {
        return NULL;
    }
    arena->used = offset + bytes;
    return (void *)start;
}

/* ------------------------------------------------------------------ loading */

const char *fsim_status_str(fsim_status status)
{
    switch (status) {
    case FSIM_OK: return "ok";
    case FSIM_ERR_MAGIC: return "not an fsim model (bad magic)";
    case FSIM_ERR_VERSION: return "unsupported model format version";
    case FSIM_ERR_TRUNCATED: return "model size does not match its header (truncated?)";
    case FSIM_ERR_SHAPE: return "inconsistent or unsupported layer shapes";
    case FSIM_ERR_ALIGN: return "model data is not 4-byte aligned";
    case FSIM_ERR_ARENA: return "arena too small (see fsim_arena_bytes)";
    }
    return "unknown status";
}

static uint32_t word(const unsigned char *p, size_t i)
{
    uint32_t v;
    memcpy(&v, p + 4u * i, 4u);
    return v;
}

static uint32_t pooled(uint32_t n, uint32_t pool) { return pool != FSIM_POOL_NONE ? n / 2u : n; }

fsim_status fsim_model_load(fsim_model *m, const void *data, size_t size)
{
    const unsigned char *p = (const unsigned char *)data;
    if (((uintptr_t)data & 3u) != 0u) return FSIM_ERR_ALIGN;
    if (size < 4u * HEADER_WORDS) return size >= 4u && word(p, 0) == FSIM_MAGIC ? FSIM_ERR_TRUNCATED : FSIM_ERR_MAGIC;
    if (word(p, 0) != FSIM_MAGIC) return FSIM_ERR_MAGIC;
    if (word(p, 1) != FSIM_VERSION) return FSIM_ERR_VERSION;
    memset(m, 0, sizeof *m);
    m->n_layers = word(p, 2);
    m->in_c = word(p, 3);
    m->in_h = word(p, 4);
    m->in_w = word(p, 5);
    m->num_classes = word(p, 6);
    m->partition = word(p, 7);
    {
        uint32_t bits = word(p, 8);
        memcpy(&m->ln_eps, &bits, 4u);
    }
    if (m->n_layers == 0u || m->n_layers > FSIM_MAX_LAYERS || m->num_classes == 0u || m->partition == 0u) {
        return FSIM_ERR_SHAPE;
    }
    if (size < 4u * (HEADER_WORDS + LAYER_WORDS * m->n_layers)) return FSIM_ERR_TRUNCATED;
    {
        size_t floats = 2u * (size_t)m->in_c, i;
        uint32_t c = m->in_c, h = m->in_h, w = m->in_w;
        for (i = 0; i < m->n_layers; ++i) {
            fsim_layer *l = &m->layers[i];
            size_t base = HEADER_WORDS + LAYER_WORDS * i;
            l->in_c = word(p, base);
            l->out_c = word(p, base + 1u);
            l->h = word(p, base + 2u);
            l->w = word(p, base + 3u);
            l->pool = word(p, base + 4u);
            if (l->in_c != c || l->h != h || l->w != w || l->out_c == 0u || l->pool > FSIM_POOL_MAX) {
                return FSIM_ERR_SHAPE;
            }
            floats += (size_t)tiles(l->out_c) * MR * l->in_c * 9u + l->out_c;
            c = l->out_c;
            h = pooled(h, l->pool);
            w = pooled(w, l->pool);
        }
        {
            const fsim_layer *last = &m->layers[m->n_layers - 1u];
            if (m->partition > last->h || m->partition > last->w) return FSIM_ERR_SHAPE;
            floats += (size_t)last->out_c * m->partition * m->partition * m->num_classes + m->num_classes;
        }
        if (size != 4u * (HEADER_WORDS + LAYER_WORDS * m->n_layers + floats)) return FSIM_ERR_TRUNCATED;
    }
    {
        const float *f = (const float *)(const void *)(p + 4u * (HEADER_WORDS + LAYER_WORDS * m->n_layers));
        uint32_t i;
        m->mean = f;
        f += m->in_c;
        m->std = f;
        f += m->in_c;
        for (i = 0; i < m->n_layers; ++i) {
            fsim_layer *l = &m->layers[i];
            l->weight = f;
            f += (size_t)tiles(l->out_c) * MR * l->in_c * 9u;
            l->bias = f;
            f += l->out_c;
        }
        m->proj_w = f;
        f += (size_t)m->layers[m->n_layers - 1u].out_c * m->partition * m->partition * m->num_classes;
        m->proj_b = f;
    }
    return FSIM_OK;
}

/* ------------------------------------------------------------------ planning */

typedef struct {
    size_t im2col, strip, goodness; /* floats */
} scratch_t;

/* Conv rows per strip: a pooling layer's 2; otherwise as many rows as fill one im2col panel
 * (narrow maps would leave most of a panel empty), at least 1 and at most h. */
static uint32_t strip_rows(const fsim_model *m, uint32_t i)
{
    const fsim_layer *l = &m->layers[i];
    uint32_t r;
    if (i + 1u < m->n_layers && l->pool != FSIM_POOL_NONE) return 2u;
    r = NR / l->w;
    return r < 1u ? 1u : (r > l->h ? l->h : r);
}

/* Scratch of layer i at r conv rows per strip. */
static scratch_t layer_scratch(const fsim_model *m, uint32_t i, uint32_t r)
{
    const fsim_layer *l = &m->layers[i];
    int exit_layer = i + 1u == m->n_layers;
    scratch_t s;
    s.im2col = (size_t)(l->in_c * 9u < KC ? l->in_c * 9u : KC) * panel_cols(r * l->w); /* one K-block */
    s.strip = (exit_layer || l->pool != FSIM_POOL_NONE) ? (size_t)l->out_c * r * l->w : 0u;
    s.goodness = exit_layer ? (size_t)l->out_c * m->partition * m->partition : 0u;
    return s;
}

static size_t scratch_bytes(scratch_t s)
{
    return align_up(4u * s.im2col) + align_up(4u * s.strip) + align_up(4u * s.goodness) + 2u * FSIM_ALIGN;
}

/* Rows per strip for layer i within `room` bytes of scratch: the planner's minimum, grown
 * (in steps that keep a pooling layer's strips even) while the scratch still fits. More
 * rows per strip mean fewer passes over the weights: a larger arena runs faster. */
static uint32_t rows_within(const fsim_model *m, uint32_t i, size_t room)
{
    const fsim_layer *l = &m->layers[i];
    uint32_t r = strip_rows(m, i), step = (i + 1u < m->n_layers && l->pool != FSIM_POOL_NONE) ? 2u : 1u;
    while (r + step <= l->h && scratch_bytes(layer_scratch(m, i, r + step)) <= room) r += step;
    return r;
}

/* Floats of tensor t: t = 0 is the normalised input, t = i + 1 the output of layer i. */
static size_t tensor_floats(const fsim_model *m, uint32_t t)
{
    const fsim_layer *l;
    if (t == 0u) return (size_t)m->in_c * m->in_h * m->in_w;
    l = &m->layers[t - 1u];
    return (size_t)l->out_c * pooled(l->h, l->pool) * pooled(l->w, l->pool);
}

static void ping_pong_floats(const fsim_model *m, size_t *a, size_t *b)
{
    uint32_t t;
    *a = *b = 0u;
    for (t = 0; t < m->n_layers; ++t) { /* the exit layer's output is logits, not a tensor */
        size_t n = tensor_floats(m, t);
        size_t *buf = (t % 2u == 0u) ? a : b;
        if (n > *buf) *buf = n;
    }
}

size_t fsim_arena_bytes(const fsim_model *m)
{
    size_t a, b, worst = 0u;
    uint32_t i;
    ping_pong_floats(m, &a, &b);
    for (i = 0; i < m->n_layers; ++i) {
        scratch_t s = layer_scratch(m, i, strip_rows(m, i));
        size_t bytes = align_up(4u * s.im2col) + align_up(4u * s.strip) + align_up(4u * s.goodness);
        if (bytes > worst) worst = bytes;
    }
    return align_up(4u * a) + (b ? align_up(4u * b) : 0u) + worst + FSIM_ALIGN; /* + worst-case base alignment */
}

/* ------------------------------------------------------------------ ops */

/* Rows k0..k1-1 of the im2col of conv output rows y0 .. y0+rows-1 (3x3, pad 1; row kk is
 * (ic, ky, kx) = (kk / 9, kk / 3 % 3, kk % 3)), row-major with rows ld floats apart: row kk
 * holds output positions 0 .. rows*w-1, then zeros up to ld (whole GEMM panels of NR).
 * Output rows whose input row is in bounds read consecutive input rows, so each run of them
 * is one copy shifted by kx - 1; the padding column each shift exposes is zeroed after. */
static void im2col_block(const float *in, uint32_t h, uint32_t w, uint32_t y0, uint32_t rows, uint32_t k0, uint32_t k1,
                         float *col, uint32_t ld)
{
    uint32_t kk, r;
    for (kk = k0; kk < k1; ++kk) {
        uint32_t ic = kk / 9u, ky = kk / 3u % 3u, kx = kk % 3u;
        int top = (int)y0 + (int)ky - 1;                   /* input row of output row y0 */
        uint32_t r0 = top < 0 ? (uint32_t)-top : 0u;       /* first output row in bounds */
        uint32_t r1 = (int)h - top < (int)rows ? (uint32_t)((int)h - top) : rows; /* one past the last */
        float *dst = col + (size_t)(kk - k0) * ld;
        memset(dst, 0, sizeof(float) * (size_t)r0 * w);
        if (r1 > r0) {
            const float *src = in + ((size_t)ic * h + (uint32_t)(top + (int)r0)) * w;
            float *d = dst + (size_t)r0 * w;
            size_t len = (size_t)(r1 - r0) * w;
            if (kx == 1u) {
                memcpy(d, src, sizeof(float) * len);
            } else if (kx == 0u) { /* d[x] = src[x - 1], column 0 of every row is padding */
                memcpy(d + 1, src, sizeof(float) * (len - 1u));
                for (r = r0; r < r1; ++r) dst[(size_t)r * w] = 0.0f;
            } else {               /* d[x] = src[x + 1], column w - 1 of every row is padding */
                memcpy(d, src + 1, sizeof(float) * (len - 1u));
                for (r = r0; r < r1; ++r) dst[(size_t)r * w + w - 1u] = 0.0f;
            }
        } else {
            r1 = r0;
        }
        memset(dst + (size_t)r1 * w, 0, sizeof(float) * ((size_t)ld - (size_t)r1 * w));
    }
}

#if defined(__AVX2__) && defined(__FMA__)
/* c (MR rows of NR floats, ldc apart) = (zero ? 0 : c) + W (kb x MR, packed) x panel (kb rows
 * of NR floats, ld apart), then, where bias is given, relu(c + bias[row]). AVX2 + FMA: the
 * accumulators stay in 12 registers, one broadcast at a time. */
static void tile_kernel(const float *w, const float *panel, uint32_t ld, uint32_t kb, float *c, size_t ldc, int zero,
                        const float *bias)
{
    __m256 acc[MR][2];
    uint32_t i, p;
    for (i = 0; i < MR; ++i) {
        acc[i][0] = zero ? _mm256_setzero_ps() : _mm256_loadu_ps(c + i * ldc);
        acc[i][1] = zero ? _mm256_setzero_ps() : _mm256_loadu_ps(c + i * ldc + 8);
    }
    for (p = 0; p < kb; ++p) {
        const __m256 x0 = _mm256_loadu_ps(panel + (size_t)p * ld), x1 = _mm256_loadu_ps(panel + (size_t)p * ld + 8);
        const float *b = w + (size_t)p * MR;
        for (i = 0; i < MR; ++i) {
            const __m256 bb = _mm256_broadcast_ss(b + i);
            acc[i][0] = _mm256_fmadd_ps(bb, x0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(bb, x1, acc[i][1]);
        }
    }
    for (i = 0; i < MR; ++i) {
        if (bias != NULL) {
            const __m256 bi = _mm256_broadcast_ss(bias + i), zero_v = _mm256_setzero_ps();
            acc[i][0] = _mm256_max_ps(_mm256_add_ps(acc[i][0], bi), zero_v);
            acc[i][1] = _mm256_max_ps(_mm256_add_ps(acc[i][1], bi), zero_v);
        }
        _mm256_storeu_ps(c + i * ldc, acc[i][0]);
        _mm256_storeu_ps(c + i * ldc + 8, acc[i][1]);
    }
}
#else
/* c (MR rows of NR floats, ldc apart) = (zero ? 0 : c) + W (kb x MR, packed) x panel (kb rows
 * of NR floats, ld apart), then, where bias is given, relu(c + bias[row]). Portable C. */
static void tile_kernel(const float *w, const float *panel, uint32_t ld, uint32_t kb, float *c, size_t ldc, int zero,
                        const float *bias)
{
    float acc[MR][NR];
    uint32_t i, j, p;
    for (i = 0; i < MR; ++i)
        for (j = 0; j < NR; ++j) acc[i][j] = zero ? 0.0f : c[i * ldc + j];
    for (p = 0; p < kb; ++p) {
        const float *x = panel + (size_t)p * ld, *b = w + (size_t)p * MR;
        for (i = 0; i < MR; ++i)
            for (j = 0; j < NR; ++j) acc[i][j] += b[i] * x[j];
    }
    for (i = 0; i < MR; ++i) {
        for (j = 0; j < NR; ++j) {
            float v = bias != NULL ? acc[i][j] + bias[i] : acc[i][j];
            c[i * ldc + j] = bias != NULL && v < 0.0f ? 0.0f : v;
        }
    }
}
#endif

/* One K-block of out[i][j] = relu(bias[i] + sum_p W[i][p] col[p][j]), i < m, j < n: adds the
 * rows k0..k1-1 of W (packed in MR-channel tiles, K = k rows; fsim_layer.weight) times the
 * im2col block (im2col_block: rows ld floats apart, ld a whole number of NR-column panels).
 * Partial sums wait in out (rows ldo apart) between blocks; the first block starts from
 * zero, the last adds the bias and applies ReLU. tile_kernel (AVX2 + FMA where the compiler
 * targets it, else portable C) works on whole MR x NR tiles of out in place; a tile cut by the
 * edge of m or n goes through a local copy. A panel (at most KC x NR floats, one cache line
 * per row) stays in L1 while every weight tile passes over it. */
static void gemm_block(const float *wt, const float *bias, const float *col, uint32_t ld, uint32_t m, uint32_t k,
                       uint32_t k0, uint32_t k1, uint32_t n, float *out, size_t ldo)
{
    uint32_t i0, j0, i, j, kb = k1 - k0;
    int first = k0 == 0u, last = k1 == k;
    for (j0 = 0; j0 < n; j0 += NR) {
        const float *panel = col + j0;
        uint32_t nr = n - j0 < NR ? n - j0 : NR;
        for (i0 = 0; i0 < m; i0 += MR) {
            const float *w = wt + ((size_t)(i0 / MR) * k + k0) * MR;
            uint32_t mr = m - i0 < MR ? m - i0 : MR;
            float *o = out + (size_t)i0 * ldo + j0;
            if (mr == MR && nr == NR) {
                tile_kernel(w, panel, ld, kb, o, ldo, first, last ? bias + i0 : NULL);
            } else {
                float acc[MR][NR], b[MR];
                for (i = 0; i < MR; ++i) {
                    b[i] = i < mr ? bias[i0 + i] : 0.0f;
                    for (j = 0; j < NR; ++j) acc[i][j] = (first || i >= mr || j >= nr) ? 0.0f : o[i * ldo + j];
                }
                tile_kernel(w, panel, ld, kb, &acc[0][0], NR, 0, last ? b : NULL);
                for (i = 0; i < mr; ++i)
                    for (j = 0; j < nr; ++j) o[i * ldo + j] = acc[i][j];
            }
        }
    }
}

/* Output rows row0.. of a 2x2, stride-2 pool over a strip of conv rows (c x rows x w, rows even).
 * One loop per kind, so that the compiler can vectorise each. */
static void pool_rows(const float *strip, uint32_t c, uint32_t rows, uint32_t w, uint32_t pool, float *out, uint32_t oh,
                      uint32_t row0)
{
    uint32_t ow = w / 2u, ch, x, pr;
    for (ch = 0; ch < c; ++ch) {
        for (pr = 0; pr < rows / 2u; ++pr) {
            const float *r0 = strip + ((size_t)ch * rows + 2u * pr) * w, *r1 = r0 + w;
            float *o = out + ((size_t)ch * oh + row0 + pr) * ow;
            if (pool == FSIM_POOL_RMS) {
                for (x = 0; x < ow; ++x) {
                    float e = 0.25f * (r0[2u * x] * r0[2u * x] + r0[2u * x + 1u] * r0[2u * x + 1u] +
                                       r1[2u * x] * r1[2u * x] + r1[2u * x + 1u] * r1[2u * x + 1u]);
                    o[x] = sqrtf(e > RMS_EPS ? e : RMS_EPS);
                }
            } else if (pool == FSIM_POOL_AVG) {
                for (x = 0; x < ow; ++x) o[x] = 0.25f * (r0[2u * x] + r0[2u * x + 1u] + r1[2u * x] + r1[2u * x + 1u]);
            } else {
                for (x = 0; x < ow; ++x) {
                    float m0 = r0[2u * x] > r0[2u * x + 1u] ? r0[2u * x] : r0[2u * x + 1u];
                    float m1 = r1[2u * x] > r1[2u * x + 1u] ? r1[2u * x] : r1[2u * x + 1u];
                    o[x] = m0 > m1 ? m0 : m1;
                }
            }
        }
    }
}

/* LayerNorm over all n values, in place, no affine. The statistics are accumulated in
 * double, in four independent sums (so that the adds pipeline), then added together. */
static void layer_norm(float *x, size_t n, float eps)
{
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0, mean, var;
    float scale, shift;
    size_t i, n4 = n & ~(size_t)3u;
    for (i = 0; i < n4; i += 4u) {
        s0 += x[i];
        s1 += x[i + 1u];
        s2 += x[i + 2u];
        s3 += x[i + 3u];
    }
    for (; i < n; ++i) s0 += x[i];
    mean = (s0 + s1 + s2 + s3) / (double)n;
    s0 = s1 = s2 = s3 = 0.0;
    for (i = 0; i < n4; i += 4u) {
        double d0 = x[i] - mean, d1 = x[i + 1u] - mean, d2 = x[i + 2u] - mean, d3 = x[i + 3u] - mean;
        s0 += d0 * d0;
        s1 += d1 * d1;
        s2 += d2 * d2;
        s3 += d3 * d3;
    }
    for (; i < n; ++i) s0 += (x[i] - mean) * (x[i] - mean);
    var = (s0 + s1 + s2 + s3) / (double)n;
    scale = (float)(1.0 / sqrt(var + eps));
    shift = (float)(-mean) * scale;
    for (i = 0; i < n; ++i) x[i] = x[i] * scale + shift;
}

/* Patch i of p along a side of n: rows [patch_lo, patch_hi), adaptive average pooling's
 * boundaries (floor(i*n/p) to ceil((i+1)*n/p)). Where p does not divide n, neighbouring
 * patches share a row; where it does, these are the even patches of n/p. */
static uint32_t patch_lo(uint32_t i, uint32_t n, uint32_t p) { return (uint32_t)((uint64_t)i * n / p); }
static uint32_t patch_hi(uint32_t i, uint32_t n, uint32_t p) { return (uint32_t)(((uint64_t)(i + 1u) * n + p - 1u) / p); }

/* Add the squares of conv rows y0.. (strip: c x rows x w) into the patch sums g (c x p x p).
 * The patch bounds are worked out once per row and patch, outside the channel loop. */
static void accumulate_goodness(const float *strip, uint32_t c, uint32_t rows, uint32_t h, uint32_t w, uint32_t y0,
                                uint32_t p, float *g)
{
    uint32_t ch, r, i, j, x;
    for (r = 0; r < rows; ++r) {
        for (i = 0; i < p; ++i) {
            if (y0 + r < patch_lo(i, h, p) || y0 + r >= patch_hi(i, h, p)) continue;
            for (j = 0; j < p; ++j) {
                uint32_t x0 = patch_lo(j, w, p), x1 = patch_hi(j, w, p);
                for (ch = 0; ch < c; ++ch) {
                    const float *s = strip + ((size_t)ch * rows + r) * w;
                    float *gp = g + ((size_t)ch * p + i) * p + j;
                    for (x = x0; x < x1; ++x) *gp += s[x] * s[x];
                }
            }
        }
    }
}

/* ------------------------------------------------------------------ the network */

fsim_status fsim_run(const fsim_model *m, fsim_arena *arena, const float *image, float *logits, fsim_trace_fn trace,
                     void *trace_ctx)
{
    size_t mark = arena->used, fa, fb, plane = (size_t)m->in_h * m->in_w, i;
    float *buf[2], *in, *out, *col, *strip, *g;
    uint32_t l, c;
    fsim_status status = FSIM_OK;
    ping_pong_floats(m, &fa, &fb);
    buf[0] = (float *)fsim_arena_alloc(arena, 4u * fa);
    buf[1] = fb ? (float *)fsim_arena_alloc(arena, 4u * fb) : NULL;
    if (buf[0] == NULL || (fb && buf[1] == NULL)) {
        arena->used = mark;
        return FSIM_ERR_ARENA;
    }
    for (c = 0; c < m->in_c; ++c)
        for (i = 0; i < plane; ++i) buf[0][c * plane + i] = (image[c * plane + i] - m->mean[c]) / m->std[c];
    for (l = 0; l < m->n_layers && status == FSIM_OK; ++l) {
        const fsim_layer *L = &m->layers[l];
        size_t layer_mark = arena->used;
        uint32_t rows = rows_within(m, l, arena->size - arena->used), k = L->in_c * 9u, y, k0;
        uint32_t kc = k_block(k);
        scratch_t s = layer_scratch(m, l, rows);
        int exit_layer = l + 1u == m->n_layers;
        int pools = !exit_layer && L->pool != FSIM_POOL_NONE;
        in = buf[l % 2u];
        out = exit_layer ? NULL : buf[(l + 1u) % 2u];
        col = (float *)fsim_arena_alloc(arena, 4u * s.im2col);
        strip = s.strip ? (float *)fsim_arena_alloc(arena, 4u * s.strip) : NULL;
        g = s.goodness ? (float *)fsim_arena_alloc(arena, 4u * s.goodness) : NULL;
        if (col == NULL || (s.strip && strip == NULL) || (s.goodness && g == NULL)) {
            status = FSIM_ERR_ARENA;
            break;
        }
        if (g) memset(g, 0, sizeof(float) * s.goodness);
        /* the last strip may be shorter; a pooling layer keeps it even, dropping an odd last row (floor) */
        for (y = 0; y < L->h; y += rows) {
            uint32_t n, ld;
            if (y + rows > L->h) rows = pools ? (L->h - y) & ~1u : L->h - y;
            if (rows == 0u) break;
            n = rows * L->w;
            ld = panel_cols(n);
            for (k0 = 0; k0 < k; k0 += kc) { /* im2col and GEMM one block of K at a time */
                uint32_t k1 = k - k0 < kc ? k : k0 + kc;
                im2col_block(in, L->h, L->w, y, rows, k0, k1, col, ld);
                if (strip != NULL)
                    gemm_block(L->weight, L->bias, col, ld, L->out_c, k, k0, k1, n, strip, (size_t)rows * L->w);
                else
                    gemm_block(L->weight, L->bias, col, ld, L->out_c, k, k0, k1, n, out + (size_t)y * L->w,
                               (size_t)L->h * L->w);
            }
            if (exit_layer)
                accumulate_goodness(strip, L->out_c, rows, L->h, L->w, y, m->partition, g);
            else if (pools)
                pool_rows(strip, L->out_c, rows, L->w, L->pool, out, L->h / 2u, y / 2u);
        }
        if (exit_layer) {
            uint32_t p = m->partition, gn = L->out_c * p * p, j;
            for (j = 0; j < gn; ++j) { /* each patch's mean: its own area, as patches may differ by a row */
                uint32_t py = j / p % p, px = j % p;
                g[j] /= (float)((patch_hi(py, L->h, p) - patch_lo(py, L->h, p)) * (patch_hi(px, L->w, p) - patch_lo(px, L->w, p)));
            }
            for (c = 0; c < m->num_classes; ++c) {
                float acc = m->proj_b[c];
                for (j = 0; j < gn; ++j) acc += g[j] * m->proj_w[(size_t)j * m->num_classes + c];
                logits[c] = acc;
            }
        } else {
            uint32_t oh = pooled(L->h, L->pool), ow = pooled(L->w, L->pool);
            layer_norm(out, (size_t)L->out_c * oh * ow, m->ln_eps);
            if (trace) trace(trace_ctx, l + 1u, out, L->out_c, oh, ow);
        }
        arena->used = layer_mark;
    }
    arena->used = mark;
    return status;
}
