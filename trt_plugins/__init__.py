"""CUDA kernels and TensorRT plugins for the fused nodes (lands with the plugins issue)."""
