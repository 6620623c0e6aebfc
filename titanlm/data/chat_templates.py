"""Alpaca records to signed token ids: prompt tokens negated (input only), response tokens positive.

This is InternEvo's SFT convention: the loader feeds abs(id) to the model and uses label -100
where the id is negative. Id 0 negated is still 0, so it cannot carry the mark; InternEvo masks
id 0 anyway because it treats it as padding (it is `<unk>` in Llama-2-style SentencePiece models,
which never produce it for text they can byte-fall-back on).
"""

from __future__ import annotations

from typing import Callable

from titanlm.data.tokenizer import Tokenizer

# (prompt ids, response ids) of one record; bos/eos are added by `encode_alpaca`'s template rules.
Template = Callable[[Tokenizer, str, str, str], tuple[list[int], list[int]]]


def internlm_v1(tok: Tokenizer, instruction: str, input: str, output: str) -> tuple[list[int], list[int]]:
    """InternLM v1 (REFERENCE §2): BOS `<|User|>:{instruction}\\n{input}<eoh>\\n<|Bot|>:` masked,
    `{output}<eoa>\\n` EOS trained. The markers are plain text, tokenized like the rest."""
    user = f"{instruction}\n{input}" if input else instruction
    prompt = tok.encode(f"<|User|>:{user}<eoh>\n<|Bot|>:", bos=True, eos=False)
    return prompt, tok.encode(f"{output}<eoa>\n", bos=False, eos=True)


def _special(tok: Tokenizer, name: str) -> int:
    i = tok.token_id(name)
    if i is None:
        raise ValueError(
            f"the llama3 template needs the special token {name}, which this tokenizer lacks; "
            f"use Llama 3's tokenizer.model or --template internlm"
        )
    return i


def llama3(tok: Tokenizer, instruction: str, input: str, output: str) -> tuple[list[int], list[int]]:
    """Llama 3 chat, masked: `<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n`
    `{instruction}\\n\\n{input}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n`; trained:
    `{output}<|eot_id|>`. Specials go in as ids; each header and message is encoded separately, as
    Meta's ChatFormat does, so the ids match what Llama 3 Instruct saw in training."""
    names = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    bos, start, end, eot = (_special(tok, n) for n in names)

    def header(role: str) -> list[int]:
        return [
            start,
            *tok.encode(role, bos=False, eos=False),
            end,
            *tok.encode("\n\n", bos=False, eos=False),
        ]

    user = f"{instruction}\n\n{input}" if input else instruction
    prompt = [bos, *header("user"), *tok.encode(user, bos=False, eos=False), eot, *header("assistant")]
    return prompt, [*tok.encode(output, bos=False, eos=False), eot]


TEMPLATES: dict[str, Template] = {"internlm": internlm_v1, "llama3": llama3}


def encode_alpaca(
    tok: Tokenizer, record: dict, index: int, template: str = "internlm", max_length: int = 2048
) -> list[int]:
    """Signed ids of Alpaca record number `index` (named in errors), cut to `max_length` tokens.

    "input" may be missing (treated as empty); "instruction" and "output" are required strings.
    """
    if not isinstance(record, dict):
        raise ValueError(
            f"record {index} is a {type(record).__name__}, not an object with instruction/output"
        )
    fields = {}
    for key, required in (("instruction", True), ("input", False), ("output", True)):
        value = record.get(key, None if required else "")
        if not isinstance(value, str):
            problem = (
                "is missing (or null)" if value is None else f"is a {type(value).__name__}, not a string"
            )
            raise ValueError(f'record {index}: key "{key}" {problem} (keys present: {sorted(record)})')
        fields[key] = value
    prompt, response = TEMPLATES[template](tok, fields["instruction"], fields["input"], fields["output"])
    return ([-i for i in prompt] + response)[:max_length]
