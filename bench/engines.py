"""The inference engines a CPU user could pick instead of FusedResNet, as throughput rows (inference only; bf16 rows
for torch.compile under autocast and OpenVINO, whose CPU plugin computes in bf16 where the CPU has AVX512_BF16):

- ``compile-freezing``: torch.compile with inductor's freezing (weights folded as constants: BatchNorm into the
  convolutions, oneDNN weight prepacking), PyTorch's best CPU inference mode;
- ``onnxruntime``: the model exported to ONNX, run by ONNX Runtime's CPU execution provider (all graph
  optimisations, as many intra-op threads as torch uses);
- ``openvino``: the model converted by ``openvino.convert_model``, compiled for the CPU with the row's inference
  precision pinned (f32 for fp32 rows: OpenVINO would otherwise pick bf16 on CPUs that have it; bf16 for bf16 rows)
  and as many threads as torch uses. ONNX Runtime's CPU provider has no bf16 convolutions: fp32 rows only.

Each is ``make(model, example) -> run(x)``; the reference model (NCHW, eval mode) is what they take."""
from __future__ import annotations

import os
import tempfile

import torch

ENGINES = ("compile-freezing", "onnxruntime", "openvino")
PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


def skip_reason(impl, dev, mode, prec):
    if impl not in ENGINES:
        return None
    if mode != "inference":
        return "an inference engine (no training)"
    if dev.type != "cpu":
        return "a CPU inference baseline"
    if impl in PACKAGES:
        if prec != "fp32" and impl == "onnxruntime":
            return "fp32 rows only (no bf16 CPU convolutions)"
        try:
            __import__(PACKAGES[impl])
        except ImportError:
            return f"pip install {PACKAGES[impl]}"
    return None


def make(impl, model, example, prec="fp32"):
    """run(x) -> logits for a batch shaped like ``example``, computed in ``prec`` ("fp32" or "bf16"; torch.compile's
    under the caller's autocast)."""
    model.eval()
    if impl == "compile-freezing":
        compiled = torch.compile(model, options={"freezing": True})
        return compiled
    if impl == "onnxruntime":
        return _onnxruntime(model, example)
    if impl == "openvino":
        return _openvino(model, example, prec)
    raise ValueError(f"unknown engine {impl!r}")


def _onnxruntime(model, example):
    import onnxruntime as ort
    path = os.path.join(tempfile.mkdtemp(prefix="resnet_fused_onnx_"), "model.onnx")
    with torch.no_grad():
        torch.onnx.export(model, (example.contiguous(),), path, input_names=["x"], output_names=["logits"],
                          dynamo=False, opset_version=17)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    def run(x):
        return torch.from_numpy(session.run(None, {"x": x.contiguous().numpy()})[0])
    return run


def _openvino(model, example, prec):
    import openvino as ov
    with torch.no_grad():
        converted = ov.convert_model(model, example_input=example.contiguous())
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(),
              "INFERENCE_PRECISION_HINT": "bf16" if prec == "bf16" else "f32", "PERFORMANCE_HINT": "LATENCY"}
    compiled = ov.Core().compile_model(converted, "CPU", config)
    request = compiled.create_infer_request()

    def run(x):
        request.infer({0: x.contiguous().numpy()})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())
    return run
