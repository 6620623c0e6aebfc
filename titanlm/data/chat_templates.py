"""Chat formats: conversations to token ids, and Alpaca records to signed token ids for SFT.

`render_chat` turns a list of {"role", "content"} messages into the ids of a family's chat format
and says which spans are assistant replies, the tokens SFT trains on; generation renders a user
turn plus the assistant's header and lets the model write the reply. Besides the built-in formats,
`load_hf_chat_template` reads a tokenizer's own Jinja2 chat template, which `render_chat` renders
the same way. `conversation_messages` reads OpenAI-style and ShareGPT conversation records.

The Alpaca templates follow InternEvo's SFT convention: prompt tokens negated (input only),
response tokens positive. The loader feeds abs(id) to the model and uses label -100 where the id
is negative. Id 0 negated is still 0, so it cannot carry the mark; InternEvo masks id 0 anyway
because it treats it as padding (it is `<unk>` in Llama-2-style SentencePiece models, which never
produce it for text they can byte-fall-back on).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from titanlm.data.tokenizer import HuggingFaceTokenizer, Tokenizer
from titanlm.errors import ConfigError, DataError
from titanlm.files import read_text_file, read_tokenizer_json

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
            raise ConfigError(
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
    """InternLM v1 (InternLM chat's format): `<|System|>:{system}\\n`, `<|User|>:{text}<eoh>\\n`, then
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
    tok: Tokenizer,
    chat_format: str | HFChatTemplate,
    messages: Sequence[Mapping[str, str]],
    generation_prompt: bool = False,
) -> Chat:
    """The ids of `messages` ({"role": system|user|assistant, "content": str}) in `chat_format`
    (one of CHAT_FORMATS, or a tokenizer's own template from `load_hf_chat_template`), ending with
    the assistant's header when `generation_prompt`, and the spans of the assistant replies."""
    if not isinstance(chat_format, HFChatTemplate) and chat_format not in CHAT_FORMATS:
        raise ConfigError(f"chat format {chat_format!r} is unknown; choose one of {', '.join(CHAT_FORMATS)}")
    for index, message in enumerate(messages):
        if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise DataError(
                f"message {index} is {dict(message)!r}; each message needs a role ({', '.join(ROLES)}) "
                "and a string content"
            )
    if isinstance(chat_format, HFChatTemplate):
        return chat_format.render(tok, messages, generation_prompt)
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

    "input" may be missing or null (how many exports write "no input"; treated as empty); "instruction" and
    "output" are required strings.
    """
    if not isinstance(record, dict):
        raise DataError(f"record {index} is a {type(record).__name__}, not an object with instruction/output")
    fields = {}
    for key, required in (("instruction", True), ("input", False), ("output", True)):
        value = record.get(key)
        if value is None and not required:
            value = ""
        if not isinstance(value, str):
            problem = "is missing (or null)" if value is None else f"is a {type(value).__name__}, not a string"
            raise DataError(f'record {index}: key "{key}" {problem} (keys present: {sorted(record)})')
        fields[key] = value
    prompt, response = TEMPLATES[template](tok, fields["instruction"], fields["input"], fields["output"])
    return ([-i for i in prompt] + response)[:max_length]


# ---------------------------------------------------------------------------------------------
# Conversation records

# ShareGPT's "from" values, and the roles they are.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def conversation_messages(record: Any) -> list[dict[str, str]]:
    """The {"role", "content"} messages of an OpenAI-style `{"messages": [{"role", "content"}]}` or
    ShareGPT `{"conversations": [{"from", "value"}]}` record, whichever key it has. Raises DataError
    saying what is wrong (no messages, an unknown role, a missing or non-string content, no
    assistant turn); the caller names the record."""
    if not isinstance(record, dict) or not ({"messages", "conversations"} & record.keys()):
        found = f"keys {sorted(record)}" if isinstance(record, dict) else f"a {type(record).__name__}"
        raise DataError(f'no "messages" (OpenAI style) or "conversations" (ShareGPT) list; found {found}')
    sharegpt = "messages" not in record
    key, role_key, content_key = ("conversations", "from", "value") if sharegpt else ("messages", "role", "content")
    roles = SHAREGPT_ROLES if sharegpt else {role: role for role in ROLES}
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        found = "empty" if turns == [] else f"a {type(turns).__name__}"
        raise DataError(f'"{key}" is {found}; expected a list of messages')
    messages = []
    for number, turn in enumerate(turns, start=1):
        role = turn.get(role_key) if isinstance(turn, dict) else None
        if role not in roles:
            raise DataError(
                f'{key} message {number} has "{role_key}": {json.dumps(role)}; expected one of {", ".join(roles)}'
            )
        content = turn.get(content_key)
        if not isinstance(content, str):
            problem = "is missing (or null)" if content is None else f"is a {type(content).__name__}, not a string"
            raise DataError(f'{key} message {number} ({role}): "{content_key}" {problem}')
        messages.append({"role": roles[role], "content": content})
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"no assistant turn among the {len(messages)} messages, so nothing to train on")
    return messages


# ---------------------------------------------------------------------------------------------
# A tokenizer's own chat template (the `chat_template` of its tokenizer_config.json)

# The special-token names transformers hands a chat template (its `special_tokens_map`).
_TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Text that spells a control token (`<|im_start|>`, `<|eot_id|>`): a template writing one the
# tokenizer has no id for would train on its characters instead.
_CONTROL_TOKEN = re.compile(r"<\|[^<>|\s]+\|>")
# How bos and eos are spelled, for a tokenizer with no tokenizer_config.json to say it.
_BOS_EOS_NAMES = ("<s>", "</s>", "<|begin_of_text|>", "<|end_of_text|>", "<bos>", "<eos>", "<|endoftext|>")
_PROBE = ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"})


@dataclass(frozen=True)
class HFChatTemplate:
    """A Jinja2 chat template rendered as transformers' `apply_chat_template` renders it, then
    tokenized as transformers tokenizes the result: special tokens in the text become their ids.

    The assistant spans come from rendering prefixes of the conversation (the technique SFT
    libraries use for templates without assistant markers): a reply's tokens are those that
    rendering message i adds to the conversation before it plus the generation prompt, up to and
    including its last special token (the end of turn); what follows (ChatML's "\\n") is input.
    A template whose prefixes are not prefixes of the whole conversation, in text or in tokens,
    has no such spans: `render` says so rather than guessing.
    """

    source: str
    origin: str  # the file it came from, for messages
    # What the template sees as bos_token, eos_token, ...
    tokens: Mapping[str, str]
    # Added token text -> id: what the text is split at before encoding, unless `split` is None.
    added: Mapping[str, int]
    split: re.Pattern | None
    # The ids of the special tokens, the last of which in a reply ends the trained span.
    special_ids: frozenset[int]

    def text(self, messages: Sequence[Mapping[str, str]], generation_prompt: bool) -> str:
        try:
            return _compile(self.source, self.origin).render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=generation_prompt,
                tools=None,
                documents=None,
                **self.tokens,
            )
        except jinja2.TemplateError as e:
            raise DataError(f"the chat template of {self.origin} failed: {e}") from None

    def encode(self, tok: Tokenizer, text: str, pieces: dict[str, list[int]] | None = None) -> list[int]:
        """The ids transformers gives `text`: added tokens as single ids, the text between them as
        text. `pieces` memoizes the text between them, which the prefixes of one conversation share."""
        if self.split is None:
            return _text(tok, text)
        pieces = {} if pieces is None else pieces
        ids: list[int] = []
        start = 0
        for match in [*self.split.finditer(text), None]:
            end = len(text) if match is None else match.start()
            if end > start:
                piece = text[start:end]
                if piece not in pieces:
                    pieces[piece] = _text(tok, piece)
                ids += pieces[piece]
            if match is not None:
                ids.append(self.added[match.group()])
                start = match.end()
        return ids

    def render(self, tok: Tokenizer, messages: Sequence[Mapping[str, str]], generation_prompt: bool) -> Chat:
        text = self.text(messages, generation_prompt)
        pieces: dict[str, list[int]] = {}
        ids = self.encode(tok, text, pieces)

        def boundary(upto: int, prompt: bool) -> int:
            prefix = self.text(messages[:upto], prompt)
            what = f"messages 1..{upto}" + (" and the generation prompt" if prompt else "")
            if not text.startswith(prefix):
                raise ConfigError(
                    f"the chat template of {self.origin} is not prefix-stable: {what} render as text that the whole "
                    "conversation does not start with, so the assistant replies cannot be located; use a "
                    "built-in --template for this model"
                )
            prefix_ids = self.encode(tok, prefix, pieces)
            if ids[: len(prefix_ids)] != prefix_ids:
                raise ConfigError(
                    f"the chat template of {self.origin} is not prefix-stable in tokens: {what} tokenize to ids that "
                    "the whole conversation does not start with (a token spans the end of message "
                    f"{upto}), so the reply cannot be cut out exactly; use a built-in --template for this model"
                )
            return len(prefix_ids)

        spans = []
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                start, end = boundary(index, True), boundary(index + 1, False)
                end = next((k + 1 for k in range(end - 1, start - 1, -1) if ids[k] in self.special_ids), end)
                if end > start:
                    spans.append((start, end))
        return Chat(ids, spans)


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`, transformers' assistant marker: renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        line = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(line)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


@functools.lru_cache(maxsize=8)
def _compile(source: str, origin: str) -> Any:
    """The template in transformers' sandboxed environment, with the helpers it gives templates."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"the chat template of {origin} is not valid Jinja2 (line {e.lineno}: {e.message})") from None


def _content(value: Any) -> str | None:
    """A token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def load_hf_chat_template(tok: Tokenizer, tokenizer_path: str) -> HFChatTemplate:
    """The chat template beside `tokenizer_path` (chat_template.jinja, else tokenizer_config.json's
    `chat_template`, as transformers reads them), checked on a short conversation: it renders, and
    every control token it writes is one token of `tok`."""
    folder = Path(tokenizer_path).parent
    config = read_tokenizer_json(folder / "tokenizer_config.json", DataError)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        source, origin = read_text_file(jinja_file), str(jinja_file)
    else:
        source, origin = config.get("chat_template"), str(folder / "tokenizer_config.json")
        if isinstance(source, list):  # named templates: [{"name", "template"}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
    if not isinstance(source, str) or not source:
        raise ConfigError(
            f"{origin} has no chat_template; the hf template needs the model's own tokenizer folder, or choose a "
            f"built-in --template ({', '.join(CHAT_FORMATS)})"
        )
    # (text, special) of every added token transformers would know of
    listed = [(name, True) for name in getattr(tok, "special_tokens", {})]  # tiktoken's
    listed += [
        (_content(t), t.get("special", False))
        for t in config.get("added_tokens_decoder", {}).values()
        if isinstance(t, dict)
    ]
    listed += [(_content(config.get(key)), True) for key in _TEMPLATE_TOKENS]
    listed += [(_content(t), True) for t in config.get("additional_special_tokens", [])]
    listed += [(name, True) for name in _BOS_EOS_NAMES if tok.token_id(name) in (tok.bos_id, tok.eos_id)]
    if isinstance(tok, HuggingFaceTokenizer):
        tokenizer_json = read_tokenizer_json(tok.path, DataError)
        listed += [(t.get("content"), t.get("special", False)) for t in tokenizer_json.get("added_tokens", [])]
    added = {name: i for name, _ in listed if name and (i := tok.token_id(name)) is not None}
    special_ids = frozenset(added[name] for name, special in listed if special and name in added)
    tokens = {key: name for key in _TEMPLATE_TOKENS if (name := _content(config.get(key)))}
    by_id = {i: name for name, i in sorted(added.items()) if i in special_ids}
    for key, token_id in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id)):
        if key not in tokens and token_id in by_id:
            tokens[key] = by_id[token_id]
    # `tokenizers` matches added tokens in the text itself, as transformers relies on; the other
    # tokenizers read all text as plain text, so the text is split at the added tokens first.
    split = None
    if not isinstance(tok, HuggingFaceTokenizer) and added:
        # Longest first, grouped by first character: `re` tries a group only where its character is.
        groups: dict[str, list[str]] = {}
        for name in sorted(added, key=len, reverse=True):
            groups.setdefault(name[0], []).append(re.escape(name[1:]))
        split = re.compile("|".join(f"{re.escape(c)}(?:{'|'.join(rest)})" for c, rest in groups.items()))
    template = HFChatTemplate(source, origin, tokens, added, split, special_ids)
    probe = template.text(_PROBE, generation_prompt=True)
    written = set(_CONTROL_TOKEN.findall(probe)) | {name for name in tokens.values() if name in probe}
    missing = sorted(name for name in written if name not in added)
    if missing:
        raise ConfigError(
            f"the chat template of {origin} writes {', '.join(missing)}, which this tokenizer has no token for; "
            "use the tokenizer the template belongs to"
        )
    return template
