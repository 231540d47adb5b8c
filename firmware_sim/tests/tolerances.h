/* Parity tolerances of the C runtime against ONNX Runtime (export/to_c.py repeats them). */
#ifndef FSIM_TOLERANCES_H
#define FSIM_TOLERANCES_H
#define FSIM_TOL_MAX_ABS 1e-3  /* largest absolute difference, per layer output and logits */
#define FSIM_TOL_NMSE 1e-7     /* sum (c - r)^2 / sum r^2, per layer output and logits */
#endif
