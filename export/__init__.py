"""Traces model_src to ONNX and builds engine folders."""
