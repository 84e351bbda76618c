"""Tasks: the Task protocol and documents, TokFSM, text corpora and tokenizers, and evaluation."""
