"""Deployment of trained asge-edge runs: ONNX, TensorRT, multi-exit cascades, inference.

Contract: this package turns a run directory (asge_edge.train) into deployable files and
checks them; it never changes a run. It needs the ``export`` extra (onnx, onnxruntime,
onnxscript); TensorRT is optional and imported only where an engine is built.
- ``graph``: the exportable PyTorch modules (early exit, Fusion net, cascade stages);
- ``to_onnx``: torch.onnx (dynamo) export with a dynamic batch, metadata, full check;
- ``verify``: ONNX Runtime against PyTorch, and ONNX Runtime latency;
- ``tensorrt``: engines via the TensorRT 10 Python API, or the trtexec command;
- ``trt_runner``: a standalone engine runner for the Jetson (TensorRT + numpy only);
- ``cascade``: per-sample early exit over several exits;
- ``inputs``: images from IDX, .npy/.npz or a folder of images;
- ``pipeline``: what ``asge-edge export`` and ``asge-edge infer`` do.
"""
