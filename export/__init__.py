"""Export of FB-Net checkpoints to ONNX graphs and TensorRT engines."""
