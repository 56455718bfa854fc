"""int8conv: turn a trained Caffe model into a calibrated INT8 deployment (ncnn and TensorRT)."""

__version__ = "0.1.0"
