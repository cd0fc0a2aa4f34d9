"""The training loop, its events and callbacks, checkpoints and measurement."""
