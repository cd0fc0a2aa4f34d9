"""Text and files for elsewhere: a standalone training script with accelerate configs, and a merged
model folder that plain transformers loads."""
