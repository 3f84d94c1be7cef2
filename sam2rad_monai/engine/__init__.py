"""Training and evaluation on MONAI's Ignite engines, and the frozen-encoder feature cache."""
