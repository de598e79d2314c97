"""Training infrastructure of rectok_fast (config, optimizer groups, schedules, EMA, engines, checkpoints, logging, latent cache)."""
