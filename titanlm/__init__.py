"""titanlm: a PyTorch-native trainer for the Llama3, InternLM and InternLM2 model families."""

__version__ = "0.1.0"
