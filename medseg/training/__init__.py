"""Training: network, loss, augmentation, loop, checkpoints."""
