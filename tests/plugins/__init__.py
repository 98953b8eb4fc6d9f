"""The bundled plugins, each end to end through HTTP (torch, ONNX, GGUF, wordllama, remote, Ray)."""
