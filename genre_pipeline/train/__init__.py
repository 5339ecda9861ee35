"""Training: the Ray Train worker loop, training data and augmentation, the driver."""
