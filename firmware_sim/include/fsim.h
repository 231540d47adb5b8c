/*
 * fsim: a portable C99 runtime for asge-edge's exported early-exit networks.
 *
 * Contract:
 * - Never calls malloc. The caller hands over one arena (fsim_arena_init) and fsim_run
 *   takes all its working memory from it, giving it back before returning.
 * - A model is the bytes of model.bin (asge-edge export --format c), used in place:
 *   weights are read where they lie (flash, or a const array from model.h), never copied.
 *   fsim_model_load checks the magic, the version, the shapes and the exact size.
 * - fsim_arena_bytes(model) is the arena fsim_run needs: two ping-pong buffers for the
 *   tensors handed between layers, plus the largest layer's scratch (an im2col strip and
 *   a conv-output strip, or the exit layer's goodness and logits).
 * - Layers: 3x3 conv (stride 1, pad 1) + ReLU, then 2x2 RMS/avg/max pooling (stride 2) and
 *   LayerNorm over (C, H, W) for the next layer; the exit layer instead reads its spatial
 *   goodness (mean square over P x P patches; where P does not divide the map, the patches
 *   take adaptive average pooling's boundaries and may share a row) through the fixed
 *   projection. float32, with float32 accumulation.
 * - Little-endian hosts and targets (model.bin is little-endian).
 */
#ifndef FSIM_H
#define FSIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FSIM_MAGIC 0x4D495346u /* "FSIM" read as a little-endian uint32 */
#define FSIM_VERSION 1u
#define FSIM_MAX_LAYERS 32u
#define FSIM_ALIGN 16u
#define FSIM_TILE 6u /* conv weights are stored in tiles of FSIM_TILE output channels (see fsim_layer) */

typedef struct {
    unsigned char *base;
    size_t size;
    size_t used;
} fsim_arena;

void fsim_arena_init(fsim_arena *arena, void *buf, size_t size);
/* FSIM_ALIGN-aligned bytes from the arena, or NULL when they do not fit. */
void *fsim_arena_alloc(fsim_arena *arena, size_t bytes);

typedef enum { FSIM_POOL_NONE = 0, FSIM_POOL_RMS = 1, FSIM_POOL_AVG = 2, FSIM_POOL_MAX = 3 } fsim_pool;

typedef struct {
    uint32_t in_c, out_c, h, w; /* input channels, output channels, spatial size (conv keeps it) */
    uint32_t pool;              /* fsim_pool applied after the conv (not on the exit layer) */
    /* conv weights, packed for the GEMM: ceil(out_c / FSIM_TILE) tiles, each K x FSIM_TILE
     * (K = in_c * 9 in (ic, ky, kx) order, the tile's channels innermost), zero-padded */
    const float *weight;
    const float *bias;          /* out_c */
} fsim_layer;

typedef struct {
    uint32_t n_layers, in_c, in_h, in_w, num_classes;
    uint32_t partition;   /* P of the exit layer: goodness has out_c * P * P values */
    float ln_eps;
    const float *mean, *std;        /* in_c each: input normalisation */
    const float *proj_w, *proj_b;   /* (out_c * P * P) x num_classes, num_classes */
    fsim_layer layers[FSIM_MAX_LAYERS];
} fsim_model;

typedef enum {
    FSIM_OK = 0,
    FSIM_ERR_MAGIC,     /* not a model.bin */
    FSIM_ERR_VERSION,   /* written by another format version */
    FSIM_ERR_TRUNCATED, /* shorter or longer than its header says */
    FSIM_ERR_SHAPE,     /* inconsistent or unsupported shapes */
    FSIM_ERR_ALIGN,     /* data not 4-byte aligned */
    FSIM_ERR_ARENA      /* the arena is smaller than fsim_arena_bytes */
} fsim_status;

const char *fsim_status_str(fsim_status status);

/* Parse model.bin bytes (4-byte aligned, kept alive by the caller) into *model. */
fsim_status fsim_model_load(fsim_model *model, const void *data, size_t size);

/* Arena bytes fsim_run needs for this model. */
size_t fsim_arena_bytes(const fsim_model *model);

/* Called after each non-exit layer with its output (c x h x w), for layer-by-layer checks. */
typedef void (*fsim_trace_fn)(void *ctx, uint32_t layer, const float *out, uint32_t c, uint32_t h, uint32_t w);

/* One image (in_c x in_h x in_w raw [0, 1] pixels) -> logits (num_classes). trace may be NULL. */
fsim_status fsim_run(const fsim_model *model, fsim_arena *arena, const float *image, float *logits,
                     fsim_trace_fn trace, void *trace_ctx);

#ifdef __cplusplus
}
#endif
#endif /* FSIM_H */
