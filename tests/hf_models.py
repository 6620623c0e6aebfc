"""Tiny Hugging Face Llama models and tokenizers, and the official chat templates, for parity tests
(transformers is a dev dependency)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from titanlm.data.tokenizer import LLAMA3_SPLIT_PATTERN, llama3_special_tokens
from titanlm.models import ModelArgs
from titanlm.models.hf_adapter import hf_config


def perturb_norms_and_biases(model: torch.nn.Module) -> None:
    """Init leaves norms at 1 and biases at 0, which would hide a dropped norm or bias."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(0.0, 0.5)


def hf_llama(args: ModelArgs, seed: int, bos_id: int | None = None, eos_id: int | None = None):
    """A random `LlamaForCausalLM` with titanlm's hyper-parameters (RoPE scaling and tying included),
    eager attention, in eval mode. Its config is built the way a Hub config.json spells it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    spelled = hf_config(args, "llama", torch.float32, bos_id, eos_id)
    spelled.pop("torch_dtype")
    config = transformers.LlamaConfig(**spelled, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    perturb_norms_and_biases(model)
    return model


# The chat templates of the official releases (Meta-Llama-3-8B-Instruct, internlm2_5-7b-chat).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
INTERNLM2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def llama3_fast_tokenizer(tokenizer_model: Path):
    """Meta's Llama 3 tiktoken file as a transformers fast tokenizer with the official chat template
    (the conversion takes a few seconds)."""
    transformers = pytest.importorskip("transformers")
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converted = TikTokenConverter(
        vocab_file=str(tokenizer_model),
        pattern=LLAMA3_SPLIT_PATTERN,
        extra_special_tokens=llama3_special_tokens(128000),
    ).converted()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=converted, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA3_TEMPLATE
    )


TINY_SPECIALS = ("<s>", "</s>", "<|im_start|>", "<|im_end|>")  # ids 0-3: bos, eos and ChatML's markers
_TINY_CORPUS = (
    "the quick brown fox jumps over the lazy dog.",
    "a cat sat on the mat and looked at the moon.",
    "What is the colour of the sky? It is blue.",
    "user\nassistant\nsystem\nHello there, how are you today?",
)


def write_tiny_tokenizer(folder: Path, vocab_size: int = 300, chat_template: str | None = None) -> Path:
    """A byte-level BPE trained on a few sentences, saved in `folder` as tokenizer.json plus a
    tokenizer_config.json (bos `<s>`, eos `</s>`, optional chat template), which titanlm's
    HuggingFaceTokenizer and transformers' AutoTokenizer both read; returns tokenizer.json.
    Every id is below `vocab_size`, so a model of that vocabulary can use it."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TINY_CORPUS, trainer)
    assert tokenizer.get_vocab_size() <= vocab_size
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder / "tokenizer.json"
