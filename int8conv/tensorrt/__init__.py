"""TensorRT and ONNX: FP32 ONNX export, SSD host decoding, Q/DQ insertion, tensor ranges and engines."""
