"""Limits: one constant each, checked before anything is allocated (docs/formats.md, "Limits")."""

MAX_CODES = 2**24  # codes per codebook (`train --num-codes`, cbtool.json codebooks)
MAX_ELEMENTS = 2**34  # elements of any one model or codebook described in cbtool.json (64 GiB of float32)
MAX_CODEBOOK_BYTES = 8 * 2**30  # one codebook tensor that `train` will allocate
MAX_SEQ_LEN = 2**20  # tokens per TokFSM sequence in cbtool.json
MAX_FSM_STATES = 100  # TokFSM states are written as two digits
MAX_VOCAB = 2**21  # tokens of a BPE vocabulary `train --vocab-size` will build
MAX_SAMPLES = 10**6  # sampled sequences of one command (`intervene -n` x prompts, spec samples, `eval --samples`)
MAX_INT_DIGITS = 18  # digits of a layer or code number in a code reference (fits int64; no huge int())
