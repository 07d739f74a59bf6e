"""Measurements behind `qwen3vl bench`: speed per phase, memory bandwidth and decode efficiency,
fidelity against a reference engine, and ONNX Runtime per-op profiles. Each system is measured in
a child process (`bench.worker`) so that its peak RSS is its own."""
