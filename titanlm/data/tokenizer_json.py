"""A Hugging Face `tokenizer.json` for a SentencePiece model or a tiktoken ranks file.

An export ships one, so that transformers' AutoTokenizer loads it as it is (a bare tiktoken file
loads only where transformers falls back to converting it itself, and no version honours a
SentencePiece model's own normalizer), and encodes text to the ids titanlm's own tokenizer gives.
It is built here with the `tokenizers` library, a dependency of titanlm, rather than with
transformers' converters: transformers is a dev extra only, and its Llama converter drops the
normalizer (NFKC, extra-whitespace removal) of models such as the demo tokenizer, which then
encode differently.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

# SentencePiece piece types (sentencepiece_model.proto) and model types.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4
_UNIGRAM, _BPE = 1, 2
_SPACE = "\u2581"  # ▁, SentencePiece's visible space


def tiktoken_json(ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str, bos: str | None) -> str:
    """The tokenizer.json of tiktoken `ranks` with the split regex `pattern` and `special_tokens`
    (numbered from len(ranks)): byte-level BPE whose merges are those tiktoken's ranks imply, a piece
    of the vocabulary taken whole as tiktoken does (ignore_merges), and `bos` put first."""
    vocab = {_byte_text(token): rank for token, rank in ranks.items()}
    merges = [(_byte_text(left), _byte_text(right)) for left, right in _tiktoken_merges(ranks)]
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    _add_specials(tokenizer, sorted(special_tokens, key=special_tokens.__getitem__), special=True)
    tokenizer.post_processor = processors.Sequence(
        [processors.ByteLevel(trim_offsets=False), *_bos_first(tokenizer, bos)]
    )
    return tokenizer.to_str(pretty=True)


def sentencepiece_json(model_file: str | Path, bos: str | None) -> str | None:
    """The tokenizer.json of a SentencePiece BPE or Unigram model: its pieces and scores, its normalizer
    (the precompiled character map, extra-whitespace removal, the dummy prefix), byte fallback and
    bos first; None for the word and char models, which tokenizer.json has no equivalent of."""
    from sentencepiece import sentencepiece_model_pb2  # protobuf: imported only by an export that needs it

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    pieces = list(proto.pieces)
    byte_fallback = proto.trainer_spec.byte_fallback
    unknown = next((i for i, piece in enumerate(pieces) if piece.type == _UNKNOWN), None)
    if proto.trainer_spec.model_type == _BPE:
        vocab = {piece.piece: i for i, piece in enumerate(pieces)}
        unk = pieces[unknown].piece if unknown is not None else None
        model = models.BPE(
            vocab, _sentencepiece_merges(pieces), unk_token=unk, fuse_unk=True, byte_fallback=byte_fallback
        )
    elif proto.trainer_spec.model_type == _UNIGRAM:
        # Pieces other than normal ones never come out of SentencePiece's lattice: keep them out of this one.
        lowest = min((piece.score for piece in pieces if piece.type == _NORMAL), default=0.0) - 100.0
        scored = [(piece.piece, piece.score if piece.type == _NORMAL else lowest) for piece in pieces]
        model = models.Unigram(scored, unknown, byte_fallback)
    else:
        return None
    tokenizer = tokenizers.Tokenizer(model)
    spec = proto.normalizer_spec
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:  # SentencePiece's own rule: spaces only, after the character map
        steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", _SPACE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decoding = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(decoding + ([decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else []))
    specials = [piece.piece for piece in pieces if piece.type in (_UNKNOWN, _CONTROL)]
    _add_specials(tokenizer, specials, special=True)
    _add_specials(tokenizer, [piece.piece for piece in pieces if piece.type == _USER_DEFINED], special=False)
    tokenizer.post_processor = processors.Sequence(_bos_first(tokenizer, bos))
    return tokenizer.to_str(pretty=True)


def with_bos_first(tokenizer_json: str | Path, bos: str | None) -> str | None:
    """A bare tokenizer.json with `bos` put first when it has no post-processor of its own (as titanlm
    trains with bos, which transformers adds only through one); None when it needs no change."""
    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    steps = _bos_first(tokenizer, bos)
    if tokenizer.post_processor is not None or not steps:
        return None
    tokenizer.post_processor = processors.Sequence(steps)
    return tokenizer.to_str(pretty=True)


def _add_specials(tokenizer: tokenizers.Tokenizer, names: Iterable[str], special: bool) -> None:
    tokens = [AddedToken(name, special=special, normalized=False) for name in names]
    if special:
        tokenizer.add_special_tokens(tokens)
    else:
        tokenizer.add_tokens(tokens)


def _bos_first(tokenizer: tokenizers.Tokenizer, bos: str | None) -> list[processors.PostProcessor]:
    """The post-processor that puts `bos` first, as titanlm's `encode(bos=True)` and transformers'
    default `add_special_tokens=True` do; nothing when the tokenizer has no bos."""
    bos_id = tokenizer.token_to_id(bos) if bos else None
    if bos_id is None:
        return []
    pair = f"{bos}:0 $A:0 {bos}:1 $B:1"
    return [processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=pair, special_tokens=[(bos, bos_id)])]


def _byte_text(token: bytes) -> str:
    """GPT-2's printable spelling of bytes, which byte-level BPE vocabularies are written in."""
    return "".join(_BYTE_CHARS[byte] for byte in token)


def _gpt2_byte_chars() -> list[str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[byte] for byte in range(256)]


_BYTE_CHARS = _gpt2_byte_chars()


def _tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that makes each token of two bytes or more, in rank order: tiktoken's BPE of the
    token's bytes with only the lower ranks allowed ends in exactly two parts."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pair_ranks = [ranks.get(parts[i] + parts[i + 1], rank) for i in range(len(parts) - 1)]
            best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[best] >= rank:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def _sentencepiece_merges(pieces: list) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the adjacent pair whose joined piece scores highest: as ranked merges,
    every split of a normal piece into two normal pieces, ordered by the joined piece's score."""
    ids = {piece.piece: i for i, piece in enumerate(pieces) if piece.type == _NORMAL}
    scores = {piece.piece: piece.score for piece in pieces if piece.type == _NORMAL}
    ranked = []
    for piece, i in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[piece], i, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]
