"""Training layer: image/label pairs, augmentation, the training loop, and the demo model's data and run."""
