"""fit-vae and fit-diffusion: devices, ranks, batches, checkpoints, latent cache, validation."""
