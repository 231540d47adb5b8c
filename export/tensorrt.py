"""TensorRT engines from the exported ONNX (TensorRT 10 Python API), or the trtexec command.

Contract:
- ``trtexec_command`` is the exact command that builds the same engine on the device
  (engines are specific to a GPU and TensorRT version, so a Jetson builds its own).
- ``compatibility_problems(model)`` lists what would stop TensorRT from parsing the ONNX:
  ops outside ``TRT_OPS`` and I/O shapes that are not static apart from the batch.
- ``build_engine`` imports tensorrt only when called. Without tensorrt or without a GPU it
  raises UserError carrying the trtexec command. Networks are strongly typed, so the ONNX's
  own casts decide precision: with --half the convs run in fp16 and the squares, goodness,
  pooling energy and LayerNorm stay fp32, exactly as exported.
Not run in the sessions that wrote it (no TensorRT, no GPU); docs/DEPLOY.md says so.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from asge_edge.checkpoint import atomic_write, write_json
from asge_edge.errors import UserError

# ONNX ops our graphs use, all in onnx-tensorrt's support matrix for TensorRT 10
# (LayerNormalization since 8.6): what compatibility_problems accepts.
TRT_OPS = frozenset({
    "Add", "AveragePool", "Cast", "Clip", "Concat", "Constant", "Conv", "Div", "Flatten", "Gemm", "Identity",
    "LayerNormalization", "MatMul", "Max", "MaxPool", "Mul", "Pow", "ReduceMean", "Relu", "Reshape", "Sqrt",
    "Sub", "Transpose", "Unsqueeze", "Squeeze",
})
BATCH_DIM = "batch"
PROFILE_BATCHES = (1, 8, 64)   # TensorRT optimisation profile: min, opt, max batch


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def compatibility_problems(model: onnx.ModelProto) -> list[str]:
    """What TensorRT would reject: unsupported ops, or dynamic dims other than the batch."""
    problems = [f"op {op} is not in the TensorRT op set" for op in sorted({n.op_type for n in model.graph.node} - TRT_OPS)]
    for value in (*model.graph.input, *model.graph.output):
        dims = _dims(value)
        if not dims or dims[0] != BATCH_DIM:
            problems.append(f"{value.name}: first dim is {dims[:1]}, expected '{BATCH_DIM}'")
        if any(not isinstance(d, int) or d <= 0 for d in dims[1:]):
            problems.append(f"{value.name}: dims {dims[1:]} after the batch are not all static")
    return problems


def shape_arg(name: str, batch: int, shape: tuple[int, ...]) -> str:
    return f"{name}:{'x'.join(str(d) for d in (batch, *shape))}"


def trtexec_command(onnx_path: Path, engine_path: Path, input_name: str, shape: tuple[int, ...],
                    batches: tuple[int, int, int] = PROFILE_BATCHES) -> str:
    """The trtexec command that builds the engine on the device (strongly typed)."""
    lo, opt, hi = batches
    return (f"trtexec --onnx={onnx_path} --saveEngine={engine_path} --stronglyTyped "
            f"--minShapes={shape_arg(input_name, lo, shape)} --optShapes={shape_arg(input_name, opt, shape)} "
            f"--maxShapes={shape_arg(input_name, hi, shape)}")


def build_engine(onnx_path: Path, engine_path: Path, input_name: str, shape: tuple[int, ...],
                 batches: tuple[int, int, int] = PROFILE_BATCHES) -> dict:
    """Build and save a serialized engine plus ``<engine>.json`` describing its I/O; return that I/O."""
    command = trtexec_command(onnx_path, engine_path, input_name, shape, batches)
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(f"tensorrt is not installed here; build the engine on the device with: {command}") from None
    import torch
    if not torch.cuda.is_available():
        raise UserError(f"TensorRT needs a GPU and none is present; build the engine on the device with: {command}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, *((b, *shape) for b in batches))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT could not build an engine from {onnx_path}; see its log above")
    atomic_write(Path(engine_path), bytes(serialized))
    io = {"engine": Path(engine_path).name, "tensorrt": trt.__version__, "profile_batches": list(batches),
          "inputs": [{"name": network.get_input(i).name, "shape": list(network.get_input(i).shape),
                      "dtype": str(network.get_input(i).dtype)} for i in range(network.num_inputs)],
          "outputs": [{"name": network.get_output(i).name, "shape": list(network.get_output(i).shape),
                       "dtype": str(network.get_output(i).dtype)} for i in range(network.num_outputs)]}
    write_json(Path(engine_path).with_suffix(".json"), io)
    return io
