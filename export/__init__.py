"""Export stage (``maskpro.export``): pattern check, ONNX, TensorRT and vLLM checkpoints."""
