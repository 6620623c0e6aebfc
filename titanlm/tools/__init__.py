"""Command-line tools, each run as `python -m titanlm.tools.<name> --help`.

- tokenize: raw text (txt / json / jsonl) to an InternEvo `.bin` + `.bin.meta` pair.
- tokenize_alpaca: Alpaca instruction data to masked SFT `.bin` files, split into train/valid.
- inspect_data: statistics, samples and validation of a bin/meta data folder.
- convert: Hugging Face model folders to and from titanlm DCP checkpoints.
- generate: sample from an HF folder or any titanlm checkpoint (KV cache, chat formats, JSON output).
- benchmark: titanlm against its peers on one model shape.
"""
