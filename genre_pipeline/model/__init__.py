"""Models: architectures and pretrained backbones, self-describing checkpoints, the predictor."""
