"""ONNX export: torch.onnx (dynamo) with a dynamic batch, metadata, the full checker.

Contract: ``export_onnx`` writes one self-contained .onnx file (no external data),
atomically, whose first input dimension is named ``batch`` and every other dimension is
static; ``metadata_props`` carries the given string map; no node carries the exporter's
Python stack trace, which names the exporting machine's source files by their absolute
paths (so the file leaks no paths, and the same module exports to the same bytes from any
checkout; the exporter's other node metadata, module names and op names, stays for
Netron and the like); the file passes
``onnx.checker.check_model(full_check=True)`` or nothing is written. ``read_metadata``
only parses the protobuf: nothing in a model file is ever evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import torch
from google.protobuf.message import DecodeError

from asge_edge.checkpoint import atomic_write
from asge_edge.errors import UserError

DEFAULT_OPSET = 18
MIN_OPSET = 17      # LayerNormalization's first opset
EXAMPLE_BATCH = 2   # the traced example; torch.export would specialise a batch of 1
STACK_TRACE = "pkg.torch.onnx.stack_trace"   # node metadata: the source line, by its absolute path


def export_onnx(module: torch.nn.Module, example_shape: tuple[int, ...], path: Path, input_name: str,
                output_names: list[str], opset: int, metadata: dict[str, Any]) -> onnx.ModelProto:
    """Export ``module`` (eval mode, CPU) and write it to ``path``; return the model.

    Args:
        module: takes one fp32 tensor of shape (batch, *example_shape).
        example_shape: the input's shape without the batch.
        path: the .onnx file to write.
        input_name, output_names: graph I/O names.
        opset: the ONNX opset (18 by default: LayerNormalization and ReduceMean with axes inputs),
            from MIN_OPSET to the newest the installed onnx knows.
        metadata: written to metadata_props; non-string values as JSON.

    Raises:
        UserError: an opset out of that range, or one the exporter could not convert to
            (it would keep its own and only log the failure).
    """
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise UserError(f"--opset {opset} is out of range: use {MIN_OPSET}..{newest} (LayerNormalization needs "
                        f"{MIN_OPSET}; this onnx knows opsets up to {newest})")
    module = module.eval().cpu()
    example = torch.rand(EXAMPLE_BATCH, *example_shape)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=[input_name],
                                    output_names=output_names, opset_version=opset,
                                    dynamic_shapes=({0: batch},), external_data=False, verbose=False)
    model = program.model_proto
    made = next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))
    if made != opset:
        raise UserError(f"--opset {opset}: the exporter could not convert the graph to it and made opset {made}; "
                        f"use --opset {made}")
    for node in model.graph.node:
        keep = [p for p in node.metadata_props if p.key != STACK_TRACE]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    onnx.helper.set_model_props(model, {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    onnx.checker.check_model(model, full_check=True)
    atomic_write(path, model.SerializeToString())
    return model


def read_metadata(path: Path) -> dict[str, str]:
    """metadata_props of an .onnx file, as strings (parsed, never evaluated)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, DecodeError) as e:
        raise UserError(f"{path} is not a readable ONNX model ({type(e).__name__}); export it again") from None
    return {p.key: p.value for p in model.metadata_props}
