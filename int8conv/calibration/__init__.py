"""Calibration: image preprocessing, activation histograms, thresholds, weight scales and the table they make."""
