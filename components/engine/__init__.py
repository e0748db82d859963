"""Training engine: the loop, its settings, samplers, optimiser, checkpoints, DDP, caches and losses."""
