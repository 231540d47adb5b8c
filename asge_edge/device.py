"""Device selection and batch placement.

Contract: ``resolve_device`` maps ``auto|cpu|cuda`` to a torch.device (auto takes CUDA
when present) and raises UserError when CUDA is asked for but absent. Batches and
models use channels_last on every device, one code path: cuDNN's tensor-core
convolutions want NHWC, and on the CPU a whole training step costs about the same in
either layout (bench/step_time.py: 0.93x-1.08x, docs/BENCHMARKS.md). Nothing here is
CUDA-only.
"""

from __future__ import annotations

import torch

from .errors import UserError

DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("auto", "bf16", "fp16", "off")


def resolve_device(name: str) -> torch.device:
    """torch.device for ``auto``, ``cpu`` or ``cuda``."""
    if name not in DEVICES:
        raise UserError(f"unknown device {name!r}: use auto, cpu or cuda")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was given but no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) in channels_last memory with channels_last strides, also when C == 1.

    With one channel both layouts hold the same bytes, and ``.contiguous(memory_format=
    torch.channels_last)`` keeps the NCHW strides; oneDNN then takes the first conv for
    NCHW and reorders its output and gradient through its blocked layout. Giving the
    size-1 channel dim stride 1 (a view, no copy) makes the layout unambiguous, and the
    first conv runs in NHWC like the others (bench/profile_step.py lists its ops).
    """
    x = x.contiguous(memory_format=torch.channels_last)
    if x.shape[1] == 1:
        x = x.as_strided(x.shape, (x.shape[2] * x.shape[3], 1, x.shape[3], 1))
    return x


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch (B, C, H, W), (B,) to ``device``, images in channels_last."""
    return channels_last(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)


def resolve_precision(amp: str, device: torch.device) -> str:
    """fp32, bf16 or fp16 for ``--amp``: auto picks bf16 on a GPU that has it, else fp16
    (with GradScalers), and fp32 on the CPU. bf16 and fp16 may be asked for on the CPU too
    (torch's CPU autocast runs both; mostly useful to test the mixed-precision path)."""
    if amp not in AMP_MODES:
        raise UserError(f"unknown --amp {amp!r}: use auto, bf16, fp16 or off")
    if amp == "off":
        return "fp32"
    if amp != "auto":
        return amp
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def native_precision(precision: str, device: torch.device) -> bool:
    """Whether ``device`` has kernels of its own for ``precision``'s convs: fp32 always, and
    a GPU always; a CPU where oneDNN reports bf16 (AVX512-BF16, AMX) or fp16 (AVX512-FP16)
    support. Elsewhere torch's CPU autocast emulates them, several times slower than fp32
    (bench/amp_cpu.py: 6x for bf16, 13x for fp16 on this project's AVX2 CI machine)."""
    if precision == "fp32" or device.type != "cpu":
        return True
    supported = {"bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported, "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported}
    return bool(supported[precision]())
