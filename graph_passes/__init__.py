"""onnx-graphsurgeon rewrites of the exported graphs: fused nodes for ONNX Runtime, weight quantization,
and TensorRT plugin nodes (pass_runner.py runs them)."""
