/*
 * fsim: run a model.bin on a batch of raw float32 images and write the logits.
 *
 *   fsim MODEL.bin INPUT.f32 OUTPUT.f32 [--arena-bytes N] [--dump-layers PREFIX] [--time]
 *
 * INPUT.f32 holds B images of in_c x in_h x in_w float32 pixels in [0, 1]; OUTPUT.f32
 * receives B x num_classes float32 logits. --arena-bytes caps the arena (default: exactly
 * what the model needs); a model that needs more is refused with the bytes it needs.
 * --dump-layers writes each non-exit layer's output, all images, to PREFIX<layer>.f32.
 * --time prints microseconds per image. Exit status: 0 ok, 2 bad input, 1 runtime error.
 * This host tool reads files with malloc; the runtime it calls (fsim.c) never allocates.
 */
#include "fsim.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    const char *prefix;
} dump_ctx;

static void dump_layer(void *ctx, uint32_t layer, const float *out, uint32_t c, uint32_t h, uint32_t w)
{
    const dump_ctx *d = (const dump_ctx *)ctx;
    char path[4096];
    FILE *f;
    snprintf(path, sizeof path, "%s%u.f32", d->prefix, (unsigned)layer);
    f = fopen(path, "ab");
    if (f != NULL) {
        fwrite(out, sizeof(float), (size_t)c * h * w, f);
        fclose(f);
    }
}

static void *read_file(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    long n;
    void *buf;
    if (f == NULL) return NULL;
    if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return NULL;
    }
    buf = malloc(n > 0 ? (size_t)n : 1u); /* malloc's alignment suits the 4-byte model data */
    if (buf != NULL && n > 0 && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *size = (size_t)n;
    return buf;
}

static int fail(const char *msg, const char *detail)
{
    fprintf(stderr, "fsim: error: %s%s\n", msg, detail ? detail : "");
    return 2;
}

int main(int argc, char **argv)
{
    const char *paths[3] = {NULL, NULL, NULL};
    size_t arena_cap = 0, model_size = 0, input_size = 0, need, per_image, batch, b;
    int npaths = 0, timing = 0, i, rc = 0;
    dump_ctx dump = {NULL};
    void *model_data, *input, *arena_buf;
    float *logits;
    fsim_model model;
    fsim_arena arena;
    fsim_status st;
    FILE *out;
    clock_t t0;

    for (i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--arena-bytes") == 0 && i + 1 < argc) {
            char *end;
            arena_cap = (size_t)strtoull(argv[++i], &end, 10);
            if (*end != '\0' || arena_cap == 0) return fail("--arena-bytes needs a positive whole number of bytes", NULL);
        } else if (strcmp(argv[i], "--dump-layers") == 0 && i + 1 < argc) {
            dump.prefix = argv[++i];
        } else if (strcmp(argv[i], "--time") == 0) {
            timing = 1;
        } else if (argv[i][0] != '-' && npaths < 3) {
            paths[npaths++] = argv[i];
        } else {
            return fail("usage: fsim MODEL.bin INPUT.f32 OUTPUT.f32 [--arena-bytes N] [--dump-layers PREFIX] [--time]", NULL);
        }
    }
    if (npaths != 3) return fail("usage: fsim MODEL.bin INPUT.f32 OUTPUT.f32 [--arena-bytes N] [--dump-layers PREFIX] [--time]", NULL);
    model_data = read_file(paths[0], &model_size);
    if (model_data == NULL) return fail("cannot read model ", paths[0]);
    st = fsim_model_load(&model, model_data, model_size);
    if (st != FSIM_OK) {
        fprintf(stderr, "fsim: error: %s: %s; export it again with 'asge-edge export --format c'\n", paths[0], fsim_status_str(st));
        free(model_data);
        return 2;
    }
    need = fsim_arena_bytes(&model);
    if (arena_cap == 0) arena_cap = need;
    if (arena_cap < need) {
        fprintf(stderr, "fsim: error: the model needs %lu arena bytes, --arena-bytes gives %lu\n", (unsigned long)need,
                (unsigned long)arena_cap);
        free(model_data);
        return 2;
    }
    input = read_file(paths[1], &input_size);
    per_image = sizeof(float) * model.in_c * model.in_h * model.in_w;
    if (input == NULL || input_size == 0 || input_size % per_image != 0) {
        fprintf(stderr, "fsim: error: %s must hold whole images of %ux%ux%u float32 (%lu bytes each)\n", paths[1],
                (unsigned)model.in_c, (unsigned)model.in_h, (unsigned)model.in_w, (unsigned long)per_image);
        free(model_data);
        free(input);
        return 2;
    }
    batch = input_size / per_image;
    arena_buf = malloc(arena_cap);
    logits = (float *)malloc(sizeof(float) * model.num_classes * batch);
    out = fopen(paths[2], "wb");
    if (arena_buf == NULL || logits == NULL || out == NULL) {
        rc = fail("cannot allocate host buffers or open ", paths[2]);
    } else {
        fsim_arena_init(&arena, arena_buf, arena_cap);
        t0 = clock();
        for (b = 0; b < batch && rc == 0; ++b) {
            st = fsim_run(&model, &arena, (const float *)input + b * (per_image / sizeof(float)),
                          logits + b * model.num_classes, dump.prefix ? dump_layer : NULL, &dump);
            if (st != FSIM_OK) {
                fprintf(stderr, "fsim: error: %s\n", fsim_status_str(st));
                rc = 1;
            }
        }
        if (timing && rc == 0) {
            printf("%.3f us/image over %lu images, arena %lu bytes\n",
                   1e6 * (double)(clock() - t0) / CLOCKS_PER_SEC / (double)batch, (unsigned long)batch, (unsigned long)need);
        }
        if (rc == 0 && fwrite(logits, sizeof(float) * model.num_classes, batch, out) != batch) rc = 1;
    }
    if (out) fclose(out);
    free(arena_buf);
    free(logits);
    free(input);
    free(model_data);
    return rc;
}
