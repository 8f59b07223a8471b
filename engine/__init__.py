"""Training, evaluation, metrics, prediction and figures around the segmenters."""
