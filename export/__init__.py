"""Traces model_src to ONNX and builds engines (lands with the export issue)."""
