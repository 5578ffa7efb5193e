"""ONNX export, the torch-free bundle runtime, the embedding store and the batch cache CLI."""
