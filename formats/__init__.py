"""The on-disk formats every stage shares: the configs (ModelConfig, QuantConfig, Mapping, BuildConfig), the
llmx checkpoint and engine directory readers and validators, safetensors streaming, Hugging Face config and
tensor-name mapping per family, tokenizer files, the tensor-parallel/pipeline-parallel layout of each rank, and
the weight formats (what each quantized Linear stores and which kernel multiplies it)."""
