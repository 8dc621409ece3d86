"""A run's files: the saved weights and manifest, and the compiled ONNX scoring graph."""
