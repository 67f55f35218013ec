"""`llmx convert`: a Hugging Face folder (plain, ModelOpt-quantized, compressed-tensors, GGUF, or a hub model ID)
-> an llmx checkpoint, and random-weight checkpoints from a config."""
