"""Threshold files: the ncnn calibration table (current and legacy) and TensorRT's cache and range files."""
