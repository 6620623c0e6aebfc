"""tokenize_chat: conversations to masked SFT data, checked against transformers' apply_chat_template."""

from __future__ import annotations

import json
import re
import shutil
from itertools import groupby
from pathlib import Path

import pytest
import torch
from hf_models import INTERNLM2_TEMPLATE, LLAMA3_TEMPLATE, write_tiny_tokenizer
from trainer_runs import read_metrics, run_in_process

from titanlm.config import load_config
from titanlm.data.binmeta import BinMetaFolder
from titanlm.data.tokenizer import build_tokenizer
from titanlm.loss import IGNORE_INDEX, token_cross_entropy
from titanlm.models.hf_checkpoint import tokenizer_file_at
from titanlm.tools.tokenize_chat import main
from titanlm.train import build_trainer

SYSTEM = {"role": "system", "content": "Be brief."}
CONVERSATIONS = [
    [
        SYSTEM,
        {"role": "user", "content": "What is the colour of the sky?"},
        {"role": "assistant", "content": "It is blue."},
        {"role": "user", "content": "And the sea?"},
        {"role": "assistant", "content": "  Blue too, mostly.\n"},
    ],
    [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hello, how are you today?"},
        {"role": "user", "content": "  a cat sat on the mat "},
        {"role": "assistant", "content": "and looked at the moon."},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "the quick brown fox."},
    ],
]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE with ChatML's specials and InternLM2's official template (vocab 300)."""
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny"), chat_template=INTERNLM2_TEMPLATE).parent


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory: pytest.TempPathFactory, llama3_path: Path) -> Path:
    """Meta's tokenizer.model beside a tokenizer_config.json with Llama 3's official template."""
    folder = tmp_path_factory.mktemp("llama3")
    shutil.copy(llama3_path, folder / "tokenizer.model")
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _write(path: Path, records: list, jsonl: bool = True) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records, indent=1))
    return path


def _messages(conversations: list[list[dict]]) -> list[dict]:
    return [{"messages": c} for c in conversations]


def _sharegpt(conversations: list[list[dict]]) -> list[dict]:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in c]} for c in conversations]


def _tokenize(source: Path, out: Path, tokenizer: Path, template: str, *extra: object) -> int:
    return main([str(source), str(out), str(tokenizer), "--template", template, "--workers", "1", *map(str, extra)])


def _documents(out: Path, split: str = "train") -> list[list[int]]:
    data = BinMetaFolder(str(out / split))
    return [data.read(i).tolist() for i in range(data.num_documents)]


def _trained_runs(ids: list[int]) -> list[list[int]]:
    """The maximal runs of positive (trained) ids."""
    return [list(run) for trained, run in groupby(ids, key=lambda i: i > 0) if trained]


def _folder_with(tmp_path: Path, tiny_folder: Path, template: str | None) -> Path:
    """The tiny tokenizer with `template` as its chat_template (None: without one)."""
    folder = tmp_path / "tok"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


# ---- the ids: transformers' apply_chat_template --------------------------------------------


@pytest.mark.parametrize("template", ["builtin", "hf"])
@pytest.mark.parametrize("family", ["llama3", "internlm2"])
def test_ids_equal_apply_chat_template_and_only_replies_with_end_of_turn_are_trained(
    tmp_path: Path,
    family: str,
    template: str,
    tiny_folder: Path,
    llama3_folder: Path,
    llama3_hf_tokenizer,
) -> None:
    transformers = pytest.importorskip("transformers")
    if family == "llama3":
        folder, oracle, end, strip = llama3_folder, llama3_hf_tokenizer, "<|eot_id|>", True
    else:
        folder, end, strip = tiny_folder, "<|im_end|>", False
        oracle = transformers.AutoTokenizer.from_pretrained(tiny_folder)
    source = _write(tmp_path / "chats.jsonl", _messages(CONVERSATIONS))
    assert (
        _tokenize(source, tmp_path / "out", folder, family if template == "builtin" else "hf", "--split_ratio", 0) == 0
    )
    tok = build_tokenizer(tokenizer_file_at(str(folder), "a test"))
    documents = _documents(tmp_path / "out")
    assert len(documents) == len(CONVERSATIONS)  # --split_ratio 0: all in train, in input order
    for ids, conversation in zip(documents, CONVERSATIONS):
        assert [abs(i) for i in ids] == oracle.apply_chat_template(conversation, return_dict=False)
        replies = [m["content"].strip() if strip else m["content"] for m in conversation if m["role"] == "assistant"]
        assert [tok.decode(run) for run in _trained_runs(ids)] == [reply + end for reply in replies]


# ChatML whose replies are marked with transformers' {% generation %} blocks, so that
# apply_chat_template(return_assistant_tokens_mask=True) gives an independent reply mask.
MARKED_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}\n{% else %}<|im_start|>"
    "{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_hf_reply_spans_equal_the_assistant_mask_of_generation_blocks(tmp_path: Path, tiny_folder: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = _folder_with(tmp_path, tiny_folder, MARKED_TEMPLATE)
    source = _write(tmp_path / "chats.jsonl", _messages(CONVERSATIONS))
    assert _tokenize(source, tmp_path / "out", folder, "hf", "--split_ratio", 0) == 0
    oracle = transformers.AutoTokenizer.from_pretrained(folder)
    for ids, conversation in zip(_documents(tmp_path / "out"), CONVERSATIONS):
        expected = oracle.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
        assert [abs(i) for i in ids] == expected["input_ids"]
        assert [int(i > 0) for i in ids] == expected["assistant_masks"]


def test_a_default_system_message_goes_where_there_is_none(tmp_path: Path, tiny_folder: Path) -> None:
    transformers = pytest.importorskip("transformers")
    oracle = transformers.AutoTokenizer.from_pretrained(tiny_folder)
    source = _write(tmp_path / "chats.jsonl", _messages(CONVERSATIONS))
    assert _tokenize(source, tmp_path / "out", tiny_folder, "hf", "--split_ratio", 0, "--system", "Hi there.") == 0
    with_system, without = _documents(tmp_path / "out")
    assert [abs(i) for i in with_system] == oracle.apply_chat_template(CONVERSATIONS[0], return_dict=False)
    expected = [{"role": "system", "content": "Hi there."}, *CONVERSATIONS[1]]
    assert [abs(i) for i in without] == oracle.apply_chat_template(expected, return_dict=False)


# ---- inputs, workers, lengths ----------------------------------------------------------------


def _many(n: int) -> list[list[dict]]:
    conversations = []
    for k in range(n):
        turns = [SYSTEM] if k % 3 == 0 else []
        for t in range(1 + k % 4):
            turns += [
                {"role": "user", "content": f"What is {k} plus {t}?"},
                {"role": "assistant", "content": f"{k} plus {t} is {k + t}."},
            ]
        conversations.append(turns)
    return conversations


def _files(out: Path) -> list[bytes]:
    return [
        (out / split / "en" / name).read_bytes()
        for split in ("train", "valid")
        for name in ("dataset.bin", "dataset.bin.meta")
    ]


def test_messages_sharegpt_jsonl_and_json_array_inputs_write_identical_files(tmp_path: Path, tiny_folder: Path) -> None:
    conversations = _many(40)
    outputs = []
    for name, records in (("messages", _messages(conversations)), ("sharegpt", _sharegpt(conversations))):
        for jsonl in (True, False):
            source = _write(tmp_path / f"{name}.{'jsonl' if jsonl else 'json'}", records, jsonl)
            assert (
                _tokenize(
                    source, tmp_path / source.name.replace(".", "_"), tiny_folder, "internlm2", "--split_ratio", 0.25
                )
                == 0
            )
            outputs.append(_files(tmp_path / source.name.replace(".", "_")))
    assert all(files == outputs[0] for files in outputs)
    assert len(_documents(tmp_path / "messages_jsonl", "valid")) == 10


@pytest.mark.slow
def test_two_workers_write_the_bytes_of_one(tmp_path: Path, tiny_folder: Path) -> None:
    source = _write(tmp_path / "chats.jsonl", _messages(_many(700)))  # more chunks than the pool has in flight
    for workers in (1, 2):
        assert (
            main(
                [
                    str(source),
                    str(tmp_path / f"w{workers}"),
                    str(tiny_folder),
                    "--template",
                    "hf",
                    "--workers",
                    str(workers),
                ]
            )
            == 0
        )
    assert _files(tmp_path / "w1") == _files(tmp_path / "w2")


def test_long_conversations_lose_whole_turns_else_their_reply_is_cut_else_they_are_dropped(
    tmp_path: Path, tiny_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long = "the quick brown fox jumps over the lazy dog. " * 6
    records = _messages(
        [
            CONVERSATIONS[1][:2],  # fits
            CONVERSATIONS[1],  # the third turn does not fit
            [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": long}],  # the reply is cut
            [{"role": "user", "content": long}, {"role": "assistant", "content": "Hello"}],  # dropped
        ]
    )
    source = _write(tmp_path / "chats.jsonl", records)
    assert _tokenize(source, tmp_path / "full", tiny_folder, "internlm2", "--split_ratio", 0) == 0
    full = _documents(tmp_path / "full")
    reply_ends = [k + 1 for k, i in enumerate(full[1]) if i == 3]  # after each trained <|im_end|>
    max_length = reply_ends[1] + 3
    assert len(full[1]) > max_length >= len(full[0])
    capsys.readouterr()
    assert (
        _tokenize(source, tmp_path / "cut", tiny_folder, "internlm2", "--split_ratio", 0, "--max_length", max_length)
        == 0
    )
    expected = f"--max_length {max_length}: cut 1 after the last reply that fits and 1 inside its first reply; "
    expected += "dropped 1"
    assert expected in capsys.readouterr().out
    fits, two_turns, cut_reply = _documents(tmp_path / "cut")
    assert fits == full[0]
    assert two_turns == full[1][: reply_ends[1]]
    assert len(cut_reply) == max_length and cut_reply == full[2][:max_length] and cut_reply[-1] > 0


def test_prompt_tokens_with_id_0_are_reported(
    tmp_path: Path, llama3_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _write(
        tmp_path / "chats.jsonl",
        _messages([[{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]]),
    )
    assert _tokenize(source, tmp_path / "out", llama3_folder, "llama3", "--split_ratio", 0) == 0  # "!" is id 0
    assert "warning: 1 input-only tokens have id 0" in capsys.readouterr().out


# ---- errors ------------------------------------------------------------------------------------

GOOD = {"messages": CONVERSATIONS[0]}
BAD_RECORDS = {
    "no messages": ({"text": "hi"}, 'line 2: no "messages" (OpenAI style) or "conversations" (ShareGPT) list'),
    "empty messages": ({"messages": []}, 'line 2: "messages" is empty'),
    "unknown role": ({"messages": [{"role": "tool", "content": "x"}]}, 'line 2: messages message 1 has "role": "tool"'),
    "unknown sharegpt role": (
        {"conversations": [{"from": "bot", "value": "x"}]},
        'line 2: conversations message 1 has "from": "bot"',
    ),
    "missing content": ({"messages": [{"role": "user"}]}, 'line 2: messages message 1 (user): "content" is missing'),
    "non-string content": (
        {"conversations": [{"from": "gpt", "value": ["x"]}]},
        'line 2: conversations message 1 (gpt): "value" is a list, not a string',
    ),
    "no assistant": ({"messages": [{"role": "user", "content": "x"}]}, "line 2: no assistant turn"),
}


def _assert_one_error(capsys: pytest.CaptureFixture[str], expected: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err


def _assert_nothing_written(tmp_path: Path, inputs: set[str]) -> None:
    assert not (tmp_path / "out").exists()
    assert {p.name for p in tmp_path.iterdir()} == inputs  # no staging folder or temporary file left


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_a_bad_record_is_named_and_nothing_is_written(
    tmp_path: Path, tiny_folder: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    record, expected = BAD_RECORDS[case]
    source = _write(tmp_path / "chats.jsonl", [GOOD, record, GOOD])
    assert _tokenize(source, tmp_path / "out", tiny_folder, "internlm2", "--split_ratio", 0) == 2
    _assert_one_error(capsys, f"{source} {expected}")
    _assert_nothing_written(tmp_path, {"chats.jsonl"})


@pytest.mark.parametrize("ratio", ["0.1", "0.9"])  # 2 records: round(0.2) = 0 in valid, round(1.8) = 2
def test_a_bad_record_is_named_even_when_the_split_ratio_would_leave_a_split_empty(
    tmp_path: Path, tiny_folder: Path, ratio: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for bad, expected in (("{oops", "line 2 is not valid JSON"), (json.dumps({"text": "hi"}), 'line 2: no "messages"')):
        source = tmp_path / "chats.jsonl"
        source.write_text(json.dumps(GOOD) + "\n" + bad + "\n")
        assert _tokenize(source, tmp_path / "out", tiny_folder, "internlm2", "--split_ratio", ratio) == 2
        _assert_one_error(capsys, f"{source} {expected}")
    _assert_nothing_written(tmp_path, {"chats.jsonl"})


def test_assistant_first_conversations_and_empty_replies_are_counted_in_warnings(
    tmp_path: Path, tiny_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reply_first = [SYSTEM, {"role": "assistant", "content": "Welcome!"}, {"role": "user", "content": "Hi"}]
    empty_reply = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]
    records = _messages(
        [reply_first, reply_first + [{"role": "assistant", "content": ""}], empty_reply, CONVERSATIONS[0]]
    )
    source = _write(tmp_path / "chats.jsonl", records)
    assert _tokenize(source, tmp_path / "out", tiny_folder, "internlm2", "--split_ratio", 0) == 0
    out = capsys.readouterr().out.splitlines()
    assert (
        "warning: 2 conversations start with an assistant reply (no user turn before it), which is trained as an "
        "answer to nothing" in out
    )
    assert "warning: 2 assistant replies are empty: only their end-of-turn token is trained" in out
    assert len(_documents(tmp_path / "out")) == 4
    source = _write(tmp_path / "chats.jsonl", _messages([CONVERSATIONS[0]]))
    assert _tokenize(source, tmp_path / "plain", tiny_folder, "internlm2", "--split_ratio", 0) == 0
    assert "warning" not in capsys.readouterr().out


def test_a_split_whose_every_record_is_dropped_is_refused_and_nothing_is_written(
    tmp_path: Path, tiny_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long = [{"role": "user", "content": "the quick brown fox " * 20}, {"role": "assistant", "content": "ok"}]
    source = _write(tmp_path / "chats.jsonl", _messages([long, long]))
    assert _tokenize(source, tmp_path / "out", tiny_folder, "internlm2", "--split_ratio", 0, "--max_length", 8) == 2
    _assert_one_error(
        capsys,
        "every record of the train split was dropped (the prompt before its first reply fills --max_length 8), so "
        "the split would be empty; nothing written: raise --max_length",
    )
    _assert_nothing_written(tmp_path, {"chats.jsonl"})


def test_bad_json_is_named_by_line_or_element_and_workers_stop_the_same_way(
    tmp_path: Path, tiny_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [json.dumps(GOOD)] * 300 + ['{"messages": [}'] + [json.dumps(GOOD)] * 300
    source = tmp_path / "chats.jsonl"
    source.write_text("\n".join(lines) + "\n")
    for workers in (1, 2):
        assert (
            main(
                [
                    str(source),
                    str(tmp_path / "out"),
                    str(tiny_folder),
                    "--template",
                    "internlm2",
                    "--workers",
                    str(workers),
                ]
            )
            == 2
        )
        _assert_one_error(capsys, f"{source} line 301 is not valid JSON")
    array = _write(tmp_path / "chats.json", [GOOD, {"messages": [{"role": "user", "content": 1}]}], jsonl=False)
    assert _tokenize(array, tmp_path / "out", tiny_folder, "internlm2", "--split_ratio", 0) == 2
    _assert_one_error(capsys, f'{array} record 2: messages message 1 (user): "content" is a int')
    array.write_text('[{"messages": []},\n oops]')
    assert _tokenize(array, tmp_path / "out", tiny_folder, "internlm2") == 2
    _assert_one_error(capsys, f"{array} is not valid JSON (line 2, column 2")
    _assert_nothing_written(tmp_path, {"chats.jsonl", "chats.json"})


# --template, the tokenizer folder's chat_template ("" keeps InternLM2's), the error
TEMPLATE_CASES = {
    "missing specials": ("llama3", "", "needs the special token <|begin_of_text|>, which this tokenizer lacks"),
    "no chat_template": ("hf", None, "tokenizer_config.json has no chat_template"),
    "not prefix-stable": (
        "hf",
        INTERNLM2_TEMPLATE + "{{ eos_token }}",
        "is not prefix-stable: messages 1..1 and the generation prompt render as text",
    ),
    "hf specials": (
        "hf",
        LLAMA3_TEMPLATE,
        "writes <|end_header_id|>, <|eot_id|>, <|start_header_id|>, which this tokenizer has no token for",
    ),
}


@pytest.mark.parametrize("case", list(TEMPLATE_CASES))
def test_a_template_the_tokenizer_cannot_serve_stops_the_run(
    tmp_path: Path, tiny_folder: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    template, chat_template, expected = TEMPLATE_CASES[case]
    source = _write(tmp_path / "chats.jsonl", [GOOD])
    tokenizer = tiny_folder if chat_template == "" else _folder_with(tmp_path, tiny_folder, chat_template)
    assert _tokenize(source, tmp_path / "out", tokenizer, template) == 2
    _assert_one_error(capsys, expected)
    _assert_nothing_written(tmp_path, {"chats.jsonl"} | ({"tok"} if chat_template != "" else set()))


def test_an_unknown_template_or_existing_output_is_refused(
    tmp_path: Path, tiny_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _write(tmp_path / "chats.jsonl", [GOOD] * 10)  # one in valid at the default --split_ratio 0.1
    with pytest.raises(SystemExit) as info:
        _tokenize(source, tmp_path / "out", tiny_folder, "chatml")
    assert info.value.code == 2 and "invalid choice: 'chatml'" in capsys.readouterr().err
    assert _tokenize(source, tmp_path / "out", tiny_folder, "internlm2") == 0
    before = _files(tmp_path / "out")
    assert _tokenize(source, tmp_path / "out", tiny_folder, "internlm") == 2
    _assert_one_error(capsys, "already exists; pass --overwrite")
    assert _files(tmp_path / "out") == before
    assert _tokenize(source, tmp_path / "out", tiny_folder, "internlm", "--overwrite") == 0
    assert _files(tmp_path / "out") != before


# ---- training on the output ----------------------------------------------------------------


def test_sft_on_multi_turn_output_trains_and_only_replies_carry_gradient(tmp_path: Path, tiny_folder: Path) -> None:
    source = _write(tmp_path / "chats.jsonl", _messages(_many(200)))
    assert _tokenize(source, tmp_path / "sft", tiny_folder, "internlm2", "--max_length", 128) == 0
    assert sum(len(_trained_runs(ids)) > 1 for ids in _documents(tmp_path / "sft")) > 60  # multi-turn
    args = [
        "--data.dataset",
        "bin",
        "--data.train_folder",
        str(tmp_path / "sft" / "train"),
        "--model.tokenizer_path",
        str(tiny_folder / "tokenizer.json"),
        "--training.seq_len",
        "128",
        "--model.attention_backend",
        "sdpa",
        "--model.n_layers",
        "1",
    ]
    trainer = build_trainer(
        load_config(
            [
                "--model.flavor",
                "debug",
                "--training.local_batch_size",
                "4",
                "--training.mixed_precision_param",
                "float32",
                "--job.dump_folder",
                str(tmp_path / "probe"),
                *args,
            ]
        )
    )
    batch = trainer.model_step.prepare(next(iter(trainer.dataloader)))
    labels = batch["labels"]
    tok = build_tokenizer(str(tiny_folder / "tokenizer.json"))
    for row in labels:
        targets = tok.decode(row[row != IGNORE_INDEX].tolist())  # every reply of the row, in order
        assert re.fullmatch(r"(\d+ plus \d+ is \d+\.<\|im_end\|>)+", targets), targets
    masked = labels == IGNORE_INDEX
    logits = trainer.model(batch["input_ids"], batch["position_ids"], batch["document_ids"]).detach().requires_grad_()
    token_cross_entropy(logits, labels).backward()
    per_position = logits.grad.abs().sum(-1)
    assert torch.all(per_position[masked] == 0) and torch.all(per_position[~masked] > 0)
    trainer.close()

    run_in_process(
        tmp_path / "run", [*args, "--training.steps", "6", "--training.local_batch_size", "2", "--optimizer.lr", "3e-3"]
    )
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses
