/*
 * fsim against a naive reference, on small random models built in memory:
 * every pooling kind, an odd spatial size, one- and two-column maps, K in up to three
 * blocks, GEMM tile edges, the exit goodness (even and uneven patches) and
 * projection, the arena (too small: refused; enough: exactly fsim_arena_bytes), and the
 * loader's checks (foreign, truncated, wrong version). Exits non-zero on any mismatch.
 */
#include "fsim.h"
#include "tolerances.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#define MAX_WORDS 200000u
#define MAX_ACT 20000u

static uint32_t model_words[MAX_WORDS]; /* test data, not runtime state */
static float ref_weight[4][MAX_ACT];     /* each layer's conv weight in out_c x in_c x 3 x 3 order */
static union {
    unsigned char bytes[1u << 20];
    double align;
} arena_mem;
#define arena_buf (arena_mem.bytes)
static int failures;

static void check(int ok, const char *what)
{
    if (!ok) {
        printf("FAIL %s\n", what);
        ++failures;
    }
}

static float lcg(uint32_t *s)
{
    *s = *s * 1664525u + 1013904223u;
    return (float)((*s >> 8) & 0xFFFFu) / 65535.0f - 0.5f;
}

typedef struct {
    uint32_t n, in_c, h, w, classes, p, chans[4], pools[4];
} spec_t;

/* Writes a model.bin for spec into model_words; returns its size in bytes. */
static size_t build(const spec_t *sp, uint32_t seed)
{
    uint32_t *q = model_words, i, c = sp->in_c, h = sp->h, w = sp->w, s = seed;
    size_t k, n;
    float eps = 1e-5f;
    *q++ = FSIM_MAGIC;
    *q++ = FSIM_VERSION;
    *q++ = sp->n;
    *q++ = sp->in_c;
    *q++ = sp->h;
    *q++ = sp->w;
    *q++ = sp->classes;
    *q++ = sp->p;
    memcpy(q++, &eps, 4);
    for (i = 0; i < sp->n; ++i) {
        *q++ = c;
        *q++ = sp->chans[i];
        *q++ = h;
        *q++ = w;
        *q++ = sp->pools[i];
        c = sp->chans[i];
        if (sp->pools[i]) {
            h /= 2u;
            w /= 2u;
        }
    }
    for (i = 0; i < 2u * sp->in_c; ++i) {
        float v = i < sp->in_c ? 0.5f : 0.25f;
        memcpy(q++, &v, 4);
    }
    c = sp->in_c;
    for (i = 0; i < sp->n; ++i) {
        uint32_t o = sp->chans[i], kk = c * 9u, t, p, r;
        for (k = 0; k < (size_t)o * kk; ++k) ref_weight[i][k] = lcg(&s);
        for (t = 0; t < (o + FSIM_TILE - 1u) / FSIM_TILE; ++t) /* pack: tiles x K x FSIM_TILE */
            for (p = 0; p < kk; ++p)
                for (r = 0; r < FSIM_TILE; ++r) {
                    uint32_t ch = t * FSIM_TILE + r;
                    float v = ch < o ? ref_weight[i][(size_t)ch * kk + p] : 0.0f;
                    memcpy(q++, &v, 4);
                }
        for (k = 0; k < o; ++k) {
            float v = lcg(&s);
            memcpy(q++, &v, 4);
        }
        c = o;
    }
    n = (size_t)c * sp->p * sp->p * sp->classes + sp->classes;
    for (k = 0; k < n; ++k) {
        float v = lcg(&s);
        memcpy(q++, &v, 4);
    }
    return 4u * (size_t)(q - model_words);
}

/* The naive reference: full-size tensors, direct convolution. */
static void reference(const fsim_model *m, const float *img, float *logits, float traces[][MAX_ACT])
{
    static float a[MAX_ACT], b[MAX_ACT];
    uint32_t l, c = m->in_c, h = m->in_h, w = m->in_w, o, i, y, x, ky, kx;
    for (i = 0; i < c * h * w; ++i) a[i] = (img[i] - m->mean[i / (h * w)]) / m->std[i / (h * w)];
    for (l = 0; l < m->n_layers; ++l) {
        const fsim_layer *L = &m->layers[l];
        for (o = 0; o < L->out_c; ++o)
            for (y = 0; y < h; ++y)
                for (x = 0; x < w; ++x) {
                    float acc = L->bias[o];
                    for (i = 0; i < c; ++i)
                        for (ky = 0; ky < 3; ++ky)
                            for (kx = 0; kx < 3; ++kx) {
                                int yy = (int)y + (int)ky - 1, xx = (int)x + (int)kx - 1;
                                if (yy >= 0 && yy < (int)h && xx >= 0 && xx < (int)w)
                                    acc += ref_weight[l][((o * c + i) * 3 + ky) * 3 + kx] * a[(i * h + (uint32_t)yy) * w + (uint32_t)xx];
                            }
                    b[(o * h + y) * w + x] = acc > 0 ? acc : 0;
                }
        c = L->out_c;
        if (l + 1 == m->n_layers) {
            uint32_t p = m->partition, g, n;
            float gd[4096];
            for (g = 0; g < c * p * p; ++g) {
                /* adaptive average pooling's patches: floor(i*n/p) to ceil((i+1)*n/p) */
                uint32_t ch = g / (p * p), py = (g / p) % p, px = g % p;
                uint32_t y0 = py * h / p, y1 = ((py + 1) * h + p - 1) / p, x0 = px * w / p, x1 = ((px + 1) * w + p - 1) / p;
                double e = 0;
                for (y = y0; y < y1; ++y)
                    for (x = x0; x < x1; ++x) e += (double)b[(ch * h + y) * w + x] * b[(ch * h + y) * w + x];
                gd[g] = (float)(e / ((y1 - y0) * (x1 - x0)));
            }
            for (n = 0; n < m->num_classes; ++n) {
                double acc = m->proj_b[n];
                for (g = 0; g < c * p * p; ++g) acc += (double)gd[g] * m->proj_w[g * m->num_classes + n];
                logits[n] = (float)acc;
            }
            return;
        }
        if (L->pool) {
            uint32_t oh = h / 2, ow = w / 2;
            for (o = 0; o < c; ++o)
                for (y = 0; y < oh; ++y)
                    for (x = 0; x < ow; ++x) {
                        float v[4] = {b[(o * h + 2 * y) * w + 2 * x], b[(o * h + 2 * y) * w + 2 * x + 1],
                                      b[(o * h + 2 * y + 1) * w + 2 * x], b[(o * h + 2 * y + 1) * w + 2 * x + 1]};
                        float r;
                        if (L->pool == FSIM_POOL_RMS) {
                            r = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2] + v[3] * v[3]) / 4;
                            r = sqrtf(r > 1e-12f ? r : 1e-12f);
                        } else if (L->pool == FSIM_POOL_AVG) {
                            r = (v[0] + v[1] + v[2] + v[3]) / 4;
                        } else {
                            r = fmaxf(fmaxf(v[0], v[1]), fmaxf(v[2], v[3]));
                        }
                        a[(o * oh + y) * ow + x] = r;
                    }
            h = oh;
            w = ow;
        } else {
            memcpy(a, b, sizeof(float) * c * h * w);
        }
        {
            double mean = 0, var = 0;
            uint32_t n = c * h * w;
            for (i = 0; i < n; ++i) mean += a[i];
            mean /= n;
            for (i = 0; i < n; ++i) var += (a[i] - mean) * (a[i] - mean);
            var /= n;
            for (i = 0; i < n; ++i) a[i] = (float)((a[i] - mean) / sqrt(var + m->ln_eps));
            memcpy(traces[l], a, sizeof(float) * n);
        }
    }
}

typedef struct {
    float (*traces)[MAX_ACT];
    double worst;
} trace_cmp;

static void compare_trace(void *ctx, uint32_t layer, const float *out, uint32_t c, uint32_t h, uint32_t w)
{
    trace_cmp *t = (trace_cmp *)ctx;
    uint32_t i;
    for (i = 0; i < c * h * w; ++i) {
        double d = fabs((double)out[i] - t->traces[layer - 1][i]);
        if (d > t->worst) t->worst = d;
    }
}

static void run_case(const char *name, const spec_t *sp)
{
    static float traces[4][MAX_ACT];
    float img[4096], got[16], want[16];
    fsim_model m;
    fsim_arena arena;
    size_t bytes = build(sp, 7u), need;
    uint32_t s = 3u, i;
    trace_cmp cmp;
    double worst = 0;
    char what[128];
    check(fsim_model_load(&m, model_words, bytes) == FSIM_OK, name);
    for (i = 0; i < sp->in_c * sp->h * sp->w; ++i) img[i] = lcg(&s) + 0.5f;
    need = fsim_arena_bytes(&m);
    /* aligned base: the plan holds at most FSIM_ALIGN of base slack and 15 B of tail padding */
    fsim_arena_init(&arena, arena_buf, need - 2u * FSIM_ALIGN);
    snprintf(what, sizeof what, "%s: an arena below fsim_arena_bytes is refused", name);
    check(fsim_run(&m, &arena, img, got, NULL, NULL) == FSIM_ERR_ARENA, what);
    fsim_arena_init(&arena, arena_buf + 4, need); /* misaligned base: the planner's slack covers it */
    cmp.traces = traces;
    cmp.worst = 0;
    reference(&m, img, want, traces);
    snprintf(what, sizeof what, "%s: runs in exactly fsim_arena_bytes", name);
    check(fsim_run(&m, &arena, img, got, compare_trace, &cmp) == FSIM_OK, what);
    for (i = 0; i < sp->classes; ++i) worst = fmax(worst, fabs((double)got[i] - want[i]));
    /* a large arena: every layer takes its largest strips (whole maps); the same results */
    fsim_arena_init(&arena, arena_buf, sizeof arena_buf);
    snprintf(what, sizeof what, "%s: runs with whole-map strips", name);
    check(fsim_run(&m, &arena, img, got, compare_trace, &cmp) == FSIM_OK, what);
    for (i = 0; i < sp->classes; ++i) worst = fmax(worst, fabs((double)got[i] - want[i]));
    printf("%-28s arena %6lu B  layers max abs %.2e  logits max abs %.2e\n", name, (unsigned long)need, cmp.worst, worst);
    snprintf(what, sizeof what, "%s: layers and logits match the reference", name);
    check(cmp.worst <= FSIM_TOL_MAX_ABS && worst <= FSIM_TOL_MAX_ABS, what);
}

static void loader_checks(void)
{
    spec_t sp = {2, 1, 8, 8, 3, 2, {4, 6}, {FSIM_POOL_RMS, 0}};
    size_t bytes = build(&sp, 1u);
    fsim_model m;
    check(fsim_model_load(&m, model_words, bytes - 4u) == FSIM_ERR_TRUNCATED, "truncated model is refused");
    check(fsim_model_load(&m, model_words, 12u) == FSIM_ERR_TRUNCATED, "header-only model is refused");
    model_words[1] = 99u;
    check(fsim_model_load(&m, model_words, bytes) == FSIM_ERR_VERSION, "other version is refused");
    model_words[0] = 0x464C457Fu; /* an ELF file */
    check(fsim_model_load(&m, model_words, bytes) == FSIM_ERR_MAGIC, "foreign file is refused");
    check(fsim_model_load(&m, (const unsigned char *)model_words + 1, bytes - 1u) == FSIM_ERR_ALIGN, "misaligned data");
    bytes = build(&sp, 1u);
    model_words[9 + 5 + 2] = 5u; /* layer 2's height no longer follows layer 1's pool */
    check(fsim_model_load(&m, model_words, bytes) == FSIM_ERR_SHAPE, "inconsistent shapes are refused");
    bytes = build(&sp, 1u);
    model_words[7] = 5u; /* P = 5 on the exit's 4x4 map */
    check(fsim_model_load(&m, model_words, bytes) == FSIM_ERR_SHAPE, "patches finer than the map are refused");
}

int main(void)
{
    spec_t rms = {3, 1, 12, 12, 5, 2, {6, 9, 17}, {FSIM_POOL_RMS, 0, 0}};
    spec_t kinds = {3, 3, 10, 10, 4, 1, {5, 7, 3}, {FSIM_POOL_AVG, FSIM_POOL_MAX, 0}};
    spec_t odd = {3, 2, 7, 9, 3, 1, {4, 6, 8}, {0, FSIM_POOL_RMS, 0}}; /* odd sizes: pools drop a row */
    spec_t single = {1, 1, 8, 8, 10, 4, {19}, {0}};
    spec_t deep = {3, 1, 8, 8, 5, 1, {40, 33, 30}, {FSIM_POOL_RMS, 0, 0}}; /* K = 360, 297: two K-blocks */
    spec_t narrow = {3, 1, 6, 2, 3, 1, {60, 9, 5}, {0, 0, 0}}; /* 2 columns, K = 540: three K-blocks */
    spec_t column = {2, 2, 5, 1, 3, 1, {4, 3}, {0, 0}};        /* 1 column: every kx != 1 tap is padding */
    spec_t uneven = {2, 1, 10, 7, 4, 3, {5, 6}, {0, 0}};      /* P=3 on 10x7: patches share a row and a column */
    spec_t whole = {1, 2, 5, 3, 3, 3, {4}, {0}};               /* P = W: one-column patches, 2 rows each, sharing */
    run_case("rms pool, P=2", &rms);
    run_case("avg and max pools", &kinds);
    run_case("odd sizes", &odd);
    run_case("one layer, P=4, 19 channels", &single);
    run_case("K in two blocks", &deep);
    run_case("narrow map, K in three blocks", &narrow);
    run_case("one-column map", &column);
    run_case("uneven patches, P=3", &uneven);
    run_case("P equal to the width", &whole);
    loader_checks();
    if (failures) {
        printf("%d check(s) failed\n", failures);
        return 1;
    }
    printf("all fsim op checks passed\n");
    return 0;
}
