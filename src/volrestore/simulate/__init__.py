"""Simulated data: the degradation (forward) model, synthetic phantoms, degraded copies of images for evaluation."""
