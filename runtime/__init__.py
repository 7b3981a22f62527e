"""Torch-free serving runtime for FB-Net bundles (ONNX Runtime or TensorRT)."""
