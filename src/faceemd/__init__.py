"""faceemd: DeepFace-EMD two-stage face identification."""
