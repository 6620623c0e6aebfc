"""Command-line tools, each run as `python -m titanlm.tools.<name> --help`.

- tokenize: raw text (txt / json / jsonl) to an InternEvo `.bin` + `.bin.meta` pair.
- tokenize_alpaca: Alpaca instruction data to masked SFT `.bin` files, split into train/valid.
- tokenize_chat: chat conversations to SFT `.bin` files, the loss on the assistant replies only.
- inspect_data: statistics, samples and validation of a bin/meta data folder.
- convert: Hugging Face model folders to and from titanlm DCP checkpoints.
- generate: sample from an HF folder or any titanlm checkpoint (KV cache, chat formats, JSON output).
- plot: loss curves from metrics.jsonl files, and an exact comparison of two runs' losses.
"""
