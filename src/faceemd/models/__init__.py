"""Face recognition backbones, checkpoint loading and the Lightning feature extractor."""
