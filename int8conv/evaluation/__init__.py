"""Evaluation: metrics, detection matching, the INT8-vs-FP32 report, HTML report and FP32-fallback search."""
