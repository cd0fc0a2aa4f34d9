"""Data for training: read a source (datasets, files), render prompts with the chat template and
tokenize them with the response mask, and the builtin task definitions."""
