"""Models in and out: PyTorch (.pth, safetensors) state dicts, ONNX and
StableHLO exports, and the conversion of others' weights."""
