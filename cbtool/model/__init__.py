"""The model: codebooks, sites, the built-in transformer, Hugging Face bases, device placement, generation and code
references."""
