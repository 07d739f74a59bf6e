"""CUDA kernels and TensorRT plugins for the fused nodes; built with CMake (`make plugins`)."""
