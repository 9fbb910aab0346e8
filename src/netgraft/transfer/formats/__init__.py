"""Readers that turn weight files (torch, safetensors, Keras, ONNX) into named tensors."""
