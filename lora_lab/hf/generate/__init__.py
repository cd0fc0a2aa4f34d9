"""Generation: streamed and stoppable (one prompt), greedy in batches (task accuracy), and decoding
without a KV cache for prompt and prefix tuning."""
