"""A generated demo corpus and its SentencePiece tokenizer, so the debug config trains offline.

The text is produced here from small word lists with a fixed seed (nothing is copied from
anywhere), and has structure a tiny model learns within a minute: agreement, counting,
arithmetic and recall of facts stated earlier in the same line.
"""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import tempfile
from dataclasses import dataclass

import sentencepiece as spm

from titanlm.errors import DataError

# Bump when the corpus or the tokenizer recipe changes, so stale caches are never reused.
DEMO_VERSION = "demo-v1"
NUM_DOCUMENTS = 20_000
VOCAB_SIZE = 512
SEED = 1234

_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()
_ADJECTIVES = "red green blue yellow small big old young quiet happy".split()
# (singular, plural) nouns and (singular, plural) verbs give subject-verb agreement to learn.
_NOUNS = [
    ("cat", "cats"),
    ("dog", "dogs"),
    ("bird", "birds"),
    ("child", "children"),
    ("farmer", "farmers"),
    ("teacher", "teachers"),
    ("fox", "foxes"),
    ("horse", "horses"),
    ("robot", "robots"),
    ("sailor", "sailors"),
]
_VERBS = [
    ("sees", "see"),
    ("likes", "like"),
    ("follows", "follow"),
    ("finds", "find"),
    ("watches", "watch"),
    ("carries", "carry"),
    ("helps", "help"),
    ("paints", "paint"),
]
_PLACES = "garden forest river market school kitchen harbour field library bridge".split()
_THINGS = "door box lamp gate chest window".split()
_COLOURS = "red green blue yellow white black purple orange".split()


@dataclass(frozen=True)
class DemoAssets:
    corpus_path: str  # one document per line
    tokenizer_path: str  # SentencePiece .model trained on the corpus


def _noun_phrase(rng: random.Random) -> tuple[str, bool]:
    singular, plural = rng.choice(_NOUNS)
    is_plural = rng.random() < 0.5
    article = "the" if is_plural else rng.choice(("the", "a"))
    return f"{article} {rng.choice(_ADJECTIVES)} {plural if is_plural else singular}", is_plural


def _sentences(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(2, 4)):
        subject, plural = _noun_phrase(rng)
        verb = rng.choice(_VERBS)[1 if plural else 0]
        obj, _ = _noun_phrase(rng)
        out.append(f"{subject} {verb} {obj} in the {rng.choice(_PLACES)}.")
    return " ".join(out)


def _arithmetic(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(3, 6)):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice(("plus", "minus", "times"))
        if op == "minus":
            a, b = max(a, b), min(a, b)
        elif op == "times":
            a, b = a % 13, b % 13
        result = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        out.append(f"{a} {op} {b} is {result}.")
    return " ".join(out)


def _counting(rng: random.Random) -> str:
    if rng.random() < 0.5:
        start = rng.randint(0, 10)
        words = _NUMBER_WORDS[start : start + rng.randint(5, 11)]
        return " ".join(words if rng.random() < 0.7 else words[::-1]) + "."
    start, step = rng.randint(0, 50), rng.randint(1, 5)
    return " ".join(str(start + step * k) for k in range(rng.randint(6, 12))) + "."


def _recall(rng: random.Random) -> str:
    keys = rng.sample(range(1, 20), rng.randint(2, 4))
    thing = rng.choice(_THINGS)
    codes = {k: rng.choice(_COLOURS) for k in keys}
    facts = " ".join(f"the code of {thing} {k} is {codes[k]}." for k in keys)
    asked = rng.choice(keys)
    return f"{facts} so the code of {thing} {asked} is {codes[asked]}."


def generate_corpus(num_documents: int = NUM_DOCUMENTS, seed: int = SEED) -> list[str]:
    """The demo documents; a pure function of its arguments."""
    rng = random.Random(seed)
    kinds = (_sentences, _arithmetic, _counting, _recall)
    return [rng.choice(kinds)(rng) for _ in range(num_documents)]


def _build(folder: str) -> DemoAssets:
    assets = _assets(folder)
    lines = generate_corpus()
    with open(assets.corpus_path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    # Training from memory into a writer keeps the .model free of (temporary) paths: the bytes
    # are a function of the corpus alone.
    with open(assets.tokenizer_path, "wb") as model, open(os.devnull, "w") as devnull:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=VOCAB_SIZE,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            byte_fallback=True,  # any text encodes without <unk>
            split_digits=True,  # numbers as digits: arithmetic stays learnable
            character_coverage=1.0,
            input_sentence_size=len(lines),  # every line, no sampling: reproducible
            num_threads=2,
            minloglevel=2,
            logstream=devnull,
        )
    return assets


def _assets(folder: str) -> DemoAssets:
    return DemoAssets(os.path.join(folder, "corpus.txt"), os.path.join(folder, "tokenizer.model"))


def demo_assets(cache_folder: str) -> DemoAssets:
    """Where the demo corpus and tokenizer of `cache_folder` are, built or not (`ensure_demo_assets` builds)."""
    return _assets(os.path.join(_cache_root(cache_folder), DEMO_VERSION))


def _cache_root(cache_folder: str) -> str:
    return os.path.abspath(os.path.expanduser(cache_folder))


def ensure_demo_assets(cache_folder: str) -> DemoAssets:
    """Create the demo corpus and tokenizer once under `cache_folder`, safely across processes.

    A file lock makes concurrent callers (torchrun ranks) wait for one builder instead of all
    building; the build happens in a temporary sibling renamed into place, so a crash never leaves
    a half-built folder that later calls would trust.
    """
    parent = _cache_root(cache_folder)
    final = os.path.join(parent, DEMO_VERSION)
    if os.path.isdir(final):
        return _assets(final)
    try:
        os.makedirs(parent, exist_ok=True)
        lock = open(os.path.join(parent, f"{DEMO_VERSION}.lock"), "w")
    except OSError as error:
        raise DataError(
            f"cannot create the demo corpus in {parent} ({error.strerror}); set data.cache_folder to a writable folder"
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(final):
            return _assets(final)
        tmp = tempfile.mkdtemp(prefix=f".{DEMO_VERSION}.tmp-", dir=parent)
        try:
            _build(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            try:
                os.rename(tmp, final)
            except OSError:
                if not os.path.isdir(final):  # a lost race only on a lock-ignoring filesystem
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing left to remove after the rename
        return _assets(final)
