"""Models: networks, diffusion and samplers, noise, checkpoints, restorers and their registry, training."""
