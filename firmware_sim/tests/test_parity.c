/*
 * fsim against ONNX Runtime, layer by layer, on a golden fixture that
 * firmware_sim/tests/make_fixture.py wrote from a trained run: model.bin, input.f32
 * (B images), layer<k>.f32 (ONNX Runtime's output of every non-exit layer k, all
 * images) and logits.f32. Prints the normalised MSE and max abs difference of every
 * layer and of the logits; exits non-zero when one exceeds tolerances.h.
 *   test_parity DATA_DIR
 */
#include "fsim.h"
#include "tolerances.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned char arena_buf[1u << 22];
static uint32_t model_words[1u << 20];
static float expected[1u << 20];
static float inputs[1u << 18];

static size_t load(const char *dir, const char *name, void *buf, size_t cap)
{
    char path[4096];
    FILE *f;
    size_t n;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    f = fopen(path, "rb");
    if (f == NULL) {
        printf("FAIL cannot open %s\n", path);
        exit(1);
    }
    n = fread(buf, 1, cap, f);
    fclose(f);
    return n;
}

typedef struct {
    const char *dir;
    uint32_t image;
    double err[2][32]; /* per layer: sum of squared error, sum of squared reference */
    double max_abs[32];
} ctx_t;

static void on_layer(void *p, uint32_t layer, const float *out, uint32_t c, uint32_t h, uint32_t w)
{
    ctx_t *ctx = (ctx_t *)p;
    char name[64];
    size_t n = (size_t)c * h * w, i;
    snprintf(name, sizeof name, "layer%u.f32", (unsigned)layer);
    load(ctx->dir, name, expected, sizeof expected);
    for (i = 0; i < n; ++i) {
        double r = expected[ctx->image * n + i], d = out[i] - r;
        ctx->err[0][layer] += d * d;
        ctx->err[1][layer] += r * r;
        if (fabs(d) > ctx->max_abs[layer]) ctx->max_abs[layer] = fabs(d);
    }
}

int main(int argc, char **argv)
{
    ctx_t ctx;
    fsim_model m;
    fsim_arena arena;
    size_t bytes, per_image, batch, b, i;
    float logits[64], ref_logits[4096];
    double se = 0, sr = 0, worst = 0;
    uint32_t l;
    int failed = 0;
    if (argc != 2) {
        printf("usage: test_parity DATA_DIR\n");
        return 2;
    }
    memset(&ctx, 0, sizeof ctx);
    ctx.dir = argv[1];
    bytes = load(argv[1], "model.bin", model_words, sizeof model_words);
    if (fsim_model_load(&m, model_words, bytes) != FSIM_OK) {
        printf("FAIL model.bin does not load\n");
        return 1;
    }
    per_image = (size_t)m.in_c * m.in_h * m.in_w;
    batch = load(argv[1], "input.f32", inputs, sizeof inputs) / (4u * per_image);
    load(argv[1], "logits.f32", ref_logits, sizeof ref_logits);
    fsim_arena_init(&arena, arena_buf, fsim_arena_bytes(&m));
    for (b = 0; b < batch; ++b) {
        ctx.image = (uint32_t)b;
        if (fsim_run(&m, &arena, inputs + b * per_image, logits, on_layer, &ctx) != FSIM_OK) {
            printf("FAIL fsim_run\n");
            return 1;
        }
        for (i = 0; i < m.num_classes; ++i) {
            double d = logits[i] - ref_logits[b * m.num_classes + i];
            se += d * d;
            sr += (double)ref_logits[b * m.num_classes + i] * ref_logits[b * m.num_classes + i];
            if (fabs(d) > worst) worst = fabs(d);
        }
    }
    printf("%lu images, arena %lu B\n", (unsigned long)batch, (unsigned long)fsim_arena_bytes(&m));
    for (l = 1; l < m.n_layers; ++l) {
        double nmse = ctx.err[0][l] / ctx.err[1][l];
        int ok = nmse <= FSIM_TOL_NMSE && ctx.max_abs[l] <= FSIM_TOL_MAX_ABS;
        printf("layer %u: nmse %.2e max abs %.2e %s\n", (unsigned)l, nmse, ctx.max_abs[l], ok ? "ok" : "FAIL");
        failed |= !ok;
    }
    {
        int ok = se / sr <= FSIM_TOL_NMSE && worst <= FSIM_TOL_MAX_ABS;
        printf("logits (exit layer %u): nmse %.2e max abs %.2e %s\n", (unsigned)m.n_layers, se / sr, worst, ok ? "ok" : "FAIL");
        failed |= !ok;
    }
    return failed;
}
