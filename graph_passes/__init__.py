"""onnx-graphsurgeon rewrites that insert fused nodes (lands with the graph-passes issue)."""
