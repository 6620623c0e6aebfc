"""Chat formats: conversations to token ids, and Alpaca records to signed token ids for SFT.

`render_chat` turns a list of {"role", "content"} messages into the ids of a family's chat format
and says which spans are assistant replies, the tokens SFT trains on; generation renders a user
turn plus the assistant's header and lets the model write the reply.

The Alpaca templates follow InternEvo's SFT convention: prompt tokens negated (input only),
response tokens positive. The loader feeds abs(id) to the model and uses label -100 where the id
is negative. Id 0 negated is still 0, so it cannot carry the mark; InternEvo masks id 0 anyway
because it treats it as padding (it is `<unk>` in Llama-2-style SentencePiece models, which never
produce it for text they can byte-fall-back on).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Callable

from titanlm.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
# The special tokens that end a reply in these formats (beside the tokenizer's eos): decoding stops there.
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<eoa>")

# Runs of ids, each marked True when it belongs to an assistant reply.
Parts = list[tuple[list[int], bool]]


@dataclass(frozen=True)
class Chat:
    ids: list[int]
    # [start, end) of each assistant reply in `ids`, its end-of-turn marker included.
    assistant_spans: list[tuple[int, int]]


def _specials(tok: Tokenizer, chat_format: str, names: Sequence[str]) -> list[int]:
    ids = [tok.token_id(name) for name in names]
    for name, i in zip(names, ids):
        if i is None:
            raise ValueError(
                f"the {chat_format} chat format needs the special token {name}, which this tokenizer lacks; "
                f"use a {chat_format} tokenizer (for Llama 3, Meta's tokenizer.model), or a chat format the "
                "tokenizer has the tokens of (internlm needs none)"
            )
    return ids


def _text(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, bos=False, eos=False)


def _llama3(tok: Tokenizer, messages: Sequence[Mapping[str, str]], generation_prompt: bool) -> Parts:
    """Meta's Llama 3 format: specials as ids; each role, "\\n\\n" and content encoded on its own,
    as Meta's ChatFormat does, so the ids match what Llama 3 Instruct saw in training."""
    names = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    bos, start, end, eot = _specials(tok, "llama3", names)

    def header(role: str) -> list[int]:
        return [start, *_text(tok, role), end, *_text(tok, "\n\n")]

    parts: Parts = [([bos], False)]
    for message in messages:
        parts.append((header(message["role"]), False))
        parts.append(([*_text(tok, message["content"].strip()), eot], message["role"] == "assistant"))
    if generation_prompt:
        parts.append((header("assistant"), False))
    return parts


def _internlm2(tok: Tokenizer, messages: Sequence[Mapping[str, str]], generation_prompt: bool) -> Parts:
    """ChatML as InternLM2 uses it: `<s>` then `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message.

    Text between specials is encoded as one piece, as transformers does with the official template,
    except that an assistant's content is encoded apart from its `assistant\\n` header: generation
    sees the header alone and writes the content after it, so training tokenizes it the same way."""
    start, end = _specials(tok, "internlm2", ("<|im_start|>", "<|im_end|>"))
    parts: Parts = [([tok.bos_id] if tok.bos_id >= 0 else [], False)]
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "assistant":
            parts.append(([start, *_text(tok, "assistant\n")], False))
            parts.append(([*_text(tok, content), end], True))
        else:
            parts.append(([start, *_text(tok, f"{role}\n{content}"), end], False))
        parts.append((_text(tok, "\n"), False))
    if generation_prompt:
        parts.append(([start, *_text(tok, "assistant\n")], False))
    return parts


def _internlm_v1(tok: Tokenizer, messages: Sequence[Mapping[str, str]], generation_prompt: bool) -> Parts:
    """InternLM v1 (REFERENCE §2): `<|System|>:{system}\\n`, `<|User|>:{text}<eoh>\\n`, then
    `<|Bot|>:` and the reply `{text}<eoa>\\n`. The markers are plain text; the text between two
    replies is encoded in one piece, as InternLM's own code encodes a whole prompt."""
    markers = {"system": "<|System|>:{}\n", "user": "<|User|>:{}<eoh>\n"}
    parts: Parts = []
    pending = ""

    def flush(text: str) -> None:
        parts.append((tok.encode(text, bos=not parts, eos=False), False))

    for message in messages:
        if message["role"] == "assistant":
            flush(pending + "<|Bot|>:")
            parts.append((_text(tok, f"{message['content']}<eoa>\n"), True))
            pending = ""
        else:
            pending += markers[message["role"]].format(message["content"])
    if pending or generation_prompt:
        flush(pending + ("<|Bot|>:" if generation_prompt else ""))
    return parts


CHAT_FORMATS: dict[str, Callable[[Tokenizer, Sequence[Mapping[str, str]], bool], Parts]] = {
    "llama3": _llama3,
    "internlm2": _internlm2,
    "internlm": _internlm_v1,
}


def render_chat(
    tok: Tokenizer, chat_format: str, messages: Sequence[Mapping[str, str]], generation_prompt: bool = False
) -> Chat:
    """The ids of `messages` ({"role": system|user|assistant, "content": str}) in `chat_format`
    (one of CHAT_FORMATS), ending with the assistant's header when `generation_prompt`, and the
    spans of the assistant replies."""
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat format {chat_format!r} is unknown; choose one of {', '.join(CHAT_FORMATS)}")
    for index, message in enumerate(messages):
        if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise ValueError(
                f"message {index} is {dict(message)!r}; each message needs a role ({', '.join(ROLES)}) "
                "and a string content"
            )
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for part, assistant in CHAT_FORMATS[chat_format](tok, messages, generation_prompt):
        if assistant:
            spans.append((len(ids), len(ids) + len(part)))
        ids.extend(part)
    return Chat(ids, spans)


# ---------------------------------------------------------------------------------------------
# Alpaca records

# (prompt ids, response ids) of one record; bos/eos are added by `encode_alpaca`'s template rules.
Template = Callable[[Tokenizer, str, str, str], tuple[list[int], list[int]]]


def _one_turn(tok: Tokenizer, chat_format: str, user: str, output: str) -> tuple[list[int], list[int]]:
    """(prompt, reply) ids of a user turn answered by `output`."""
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    chat = render_chat(tok, chat_format, messages)
    ((start, _),) = chat.assistant_spans
    return chat.ids[:start], chat.ids[start:]


def internlm_v1(tok: Tokenizer, instruction: str, input: str, output: str) -> tuple[list[int], list[int]]:
    """InternLM v1: BOS `<|User|>:{instruction}\\n{input}<eoh>\\n<|Bot|>:` masked, `{output}<eoa>\\n`
    EOS trained."""
    prompt, reply = _one_turn(tok, "internlm", f"{instruction}\n{input}" if input else instruction, output)
    return prompt, reply + ([tok.eos_id] if tok.eos_id >= 0 else [])


def llama3(tok: Tokenizer, instruction: str, input: str, output: str) -> tuple[list[int], list[int]]:
    """Llama 3 chat, masked: `<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n`
    `{instruction}\\n\\n{input}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n`; trained:
    `{output}<|eot_id|>`."""
    return _one_turn(tok, "llama3", f"{instruction}\n\n{input}" if input else instruction, output)


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
