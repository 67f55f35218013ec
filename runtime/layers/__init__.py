"""Building blocks of the model families: Linear over a QuantMethod, attention over the paged KV cache,
RoPE, RMSNorm, vocabulary-parallel embedding and LM head."""
