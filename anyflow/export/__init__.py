"""Export and deployment (DESIGN §6): real-valued rotary for export, ONNX export + parity, release manifest,
runtime backends (torch / ONNX Runtime / TensorRT) for any-step generation."""
