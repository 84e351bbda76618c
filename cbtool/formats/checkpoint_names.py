"""The checkpoint directory's format name, version and file names, without torch (cbtool/formats/checkpoint.py
re-exports them): a store names its checkpoint's cbtool.json, and reading a store must not import torch
(docs/cli.md "Start-up")."""

FORMAT = "cbtool-checkpoint"
FORMAT_VERSION = 1
META = "cbtool.json"
CODEBOOKS = "codebooks.safetensors"
MODEL = "model.safetensors"
TRAIN_STATE = "train_state.safetensors"
