"""Tiny Hugging Face causal LMs for the tests of kforcing.teachers.hf_teacher: built from configs with random weights
and saved with save_pretrained to a temporary directory (nothing is downloaded)."""

import torch

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
VOCAB = 300


def tiny_config(family, vocab_size=VOCAB, max_len=128):
    """2 layers, width 64, 4 heads (2 key/value heads where the family has GQA); weights N(0, 0.1) so that
    attention is far from uniform and a wrong mask shows."""
    import transformers

    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=max_len,
                                       initializer_range=0.1, bos_token_id=0, eos_token_id=0)
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                    "mistral": transformers.MistralConfig}[family]
    return config_class(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len,
                        initializer_range=0.1, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                        pad_token_id=None)


def save_tiny(family, directory, seed=0, dtype=torch.float32, tokenizer=None, **config):
    """A random tiny model of `family`, saved to `directory` (with tokenizer.json when a kforcing Tokenizer is
    given); returns it loaded with transformers' own sdpa attention, in eval mode (the oracle)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **config), attn_implementation="sdpa")
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save(directory)
    return model.to(dtype).eval()


def tiny_tokenizer(vocab_size):
    """A byte-level BPE of exactly vocab_size tokens, trained on a little of the default corpus (the stdlib)."""
    from kforcing.data import iter_documents, train_tokenizer

    texts = [text for _, text in iter_documents("stdlib", max_bytes=300_000)]
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    assert tokenizer.vocab_size == vocab_size
    return tokenizer
