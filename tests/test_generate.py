"""python -m titanlm.tools.generate: transformers is the oracle for tokens, log-probabilities and chat prompts.

Models are tiny random Llamas saved with save_pretrained next to a tiny byte-level BPE tokenizer
(ids 0-3: <s>, </s>, <|im_start|>, <|im_end|>); the Llama 3 chat test uses Meta's real tokenizer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hf_models import INTERNLM2_TEMPLATE, hf_llama, perturb_norms_and_biases, write_tiny_tokenizer

from titanlm.checkpoint.hf_export import export_hf_folder
from titanlm.checkpoint.manifest import write_manifest
from titanlm.data.chat_templates import render_chat
from titanlm.data.tokenizer import build_tokenizer
from titanlm.models import ModelArgs, Transformer
from titanlm.models.flavors import RopeScaling
from titanlm.models.hf_adapter import from_hf_state_dict
from titanlm.models.spec import ModelSpec, write_record
from titanlm.models.transformer import KVCache
from titanlm.tools.generate import main

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

# Llama 3.0-style: untied, no scaling, sizes that divide nothing evenly.
LLAMA30 = ModelArgs(
    dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=93, vocab_size=301, rope_theta=500000.0, max_seq_len=256
)
# 3.1-style 'llama3' RoPE scaling, with an original length shorter than the test sequences.
SCALING = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=16)
LLAMA31 = replace(LLAMA30, dim=64, n_heads=4, ffn_dim=160, rope_scaling=SCALING)
LLAMA32 = replace(LLAMA31, rope_scaling=replace(SCALING, factor=32.0), tie_embeddings=True)

PROMPTS = ("the quick brown fox jumps over the lazy dog. a cat sat", "What")  # 15 and 2 tokens
STOPS = [1, 3]  # </s> and <|im_end|>, the tiny tokenizer's eos and end of turn
GREEDY = ("--temperature", "0", "--max_new_tokens", "12")

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the colour of the sky?"},
    {"role": "assistant", "content": "It is blue."},
    {"role": "user", "content": "How are you today?"},
]


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"), chat_template=INTERNLM2_TEMPLATE)


def _hf_folder(folder: Path, args: ModelArgs, seed: int, tokenizer: Path):
    """A transformers Llama saved in `folder` with the tokenizer beside it; returns the model."""
    model = hf_llama(args, seed, bos_id=0, eos_id=1)
    model.save_pretrained(folder)
    for file in tokenizer.parent.iterdir():
        shutil.copy(file, folder / file.name)
    return model


def _save_checkpoint(folder: Path, model: Transformer, spec: ModelSpec) -> None:
    """A DCP checkpoint as titanlm writes one: the model, its record, and the manifest last."""
    dcp.save({"model": model.state_dict()}, checkpoint_id=folder, no_dist=True)
    write_record(folder, spec)
    write_manifest(str(folder), [], step=0)


def _generate(capsys: pytest.CaptureFixture[str], *argv: object) -> list[dict]:
    assert main([str(arg) for arg in argv] + ["--json"]) == 0, capsys.readouterr().err
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _prompts(*texts: str) -> list[str]:
    return [arg for text in texts for arg in ("--prompt", text)]


def _hf_greedy(model, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens for one prompt and the log-softmax of its raw logits at each."""
    out = model.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=new_tokens,
        eos_token_id=STOPS,
        pad_token_id=STOPS[0],
        output_logits=True,
        return_dict_in_generate=True,
    )
    ids = out.sequences[0, len(prompt_ids) :].tolist()
    return ids, [step.log_softmax(-1)[0, token].item() for step, token in zip(out.logits, ids)]


def _assert_same(results: list[dict], expected: list[dict]) -> None:
    assert [r["completion_ids"] for r in results] == [e["completion_ids"] for e in expected]
    for result, other in zip(results, expected):
        torch.testing.assert_close(torch.tensor(result["logprobs"]), torch.tensor(other["logprobs"]), rtol=0, atol=1e-5)


# ---- decoding ------------------------------------------------------------------------------


def test_internlm2_native_folder_generates_what_transformers_does_on_its_llama_export(
    tmp_path: Path, tiny_tokenizer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """InternLM2 has no transformers class: its native layout (packed wqkv) must decode exactly like
    its Llama-layout export does in transformers."""
    transformers = pytest.importorskip("transformers")
    args = replace(LLAMA30, rope_theta=1000000.0, rope_scaling=RopeScaling("dynamic", 2.0), max_seq_len=4096)
    model = Transformer(args)
    model.init_weights(seed=5)
    perturb_norms_and_biases(model)
    spec = ModelSpec("internlm2", args, tokenizer_path=str(tiny_tokenizer))
    for layout in ("native", "llama"):
        (tmp_path / layout).mkdir()
        export_hf_folder(model.state_dict(), spec, tmp_path / layout, torch.float32, layout)
    results = _generate(capsys, "--checkpoint", tmp_path / "native", *_prompts(*PROMPTS), *GREEDY)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama", attn_implementation="eager").eval()
    for result in results:
        ids, logprobs = _hf_greedy(hf, result["prompt_ids"], new_tokens=12)
        assert result["completion_ids"] == ids
        torch.testing.assert_close(torch.tensor(result["logprobs"]), torch.tensor(logprobs), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "args", [LLAMA30, LLAMA31, LLAMA32], ids=["3.0-untied-odd", "3.1-rope-scaling", "3.2-tied-scaled"]
)
def test_greedy_tokens_and_logprobs_equal_transformers(
    tmp_path: Path, tiny_tokenizer: Path, capsys: pytest.CaptureFixture[str], args: ModelArgs
) -> None:
    hf = _hf_folder(tmp_path / "hf", args, seed=0, tokenizer=tiny_tokenizer)
    results = _generate(capsys, "--checkpoint", tmp_path / "hf", *_prompts(*PROMPTS), *GREEDY)

    tok = build_tokenizer(str(tiny_tokenizer))
    assert [r["prompt"] for r in results] == list(PROMPTS)
    assert [r["prompt_ids"] for r in results] == [tok.encode(p, bos=True, eos=False) for p in PROMPTS]
    assert len(results[0]["prompt_ids"]) + 12 > SCALING.original_max_seq_len
    for result in results:  # decoded together, left-padded; transformers decodes each alone
        ids, logprobs = _hf_greedy(hf, result["prompt_ids"], new_tokens=12)
        assert result["completion_ids"] == ids
        torch.testing.assert_close(torch.tensor(result["logprobs"]), torch.tensor(logprobs), rtol=0, atol=1e-4)
        stopped = ids[-1] in STOPS
        assert result["finish_reason"] == ("stop" if stopped else "length")
        assert result["completion"] == tok.decode(ids[:-1] if stopped else ids)


def test_a_left_padded_batch_gives_each_prompt_what_it_gives_alone(
    tmp_path: Path, tiny_tokenizer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _hf_folder(tmp_path / "hf", LLAMA32, seed=1, tokenizer=tiny_tokenizer)
    prompts = ("a", *PROMPTS, "Hello there, how are you today? It is blue.")
    alone = [_generate(capsys, "--checkpoint", tmp_path / "hf", "--prompt", p, *GREEDY)[0] for p in prompts]
    together = _generate(capsys, "--checkpoint", tmp_path / "hf", *_prompts(*prompts), *GREEDY)
    in_pairs = _generate(capsys, "--checkpoint", tmp_path / "hf", *_prompts(*prompts), *GREEDY, "--batch_size", 3)
    _assert_same(together, alone)
    _assert_same(in_pairs, alone)

    (tmp_path / "prompts.txt").write_text("\n".join(prompts[:2]) + "\n\n")  # a blank line is no prompt
    from_file = _generate(
        capsys,
        "--checkpoint",
        tmp_path / "hf",
        "--prompts_file",
        tmp_path / "prompts.txt",
        "--prompt",
        prompts[2],
        *GREEDY,
    )
    assert [r["prompt"] for r in from_file] == [prompts[2], *prompts[:2]]
    _assert_same(from_file, [alone[2], *alone[:2]])


def test_decoding_with_the_cache_gives_the_logits_of_a_full_forward_pass() -> None:
    model = Transformer(LLAMA31)
    model.init_weights(seed=2)
    perturb_norms_and_biases(model)
    tokens = torch.randint(0, LLAMA31.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    cache = KVCache(LLAMA31, torch.ones(2, 24, dtype=torch.bool), torch.float32)
    with torch.no_grad():
        full = model(tokens)
        steps = [model(tokens[:, :16], cache=cache)]
        steps += [model(tokens[:, i : i + 1], torch.tensor([[i]]), cache=cache) for i in range(16, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 15:], rtol=0, atol=1e-5)


def test_sampling_is_seeded_and_logprobs_are_the_raw_models(
    tmp_path: Path, tiny_tokenizer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hf = _hf_folder(tmp_path / "hf", LLAMA30, seed=2, tokenizer=tiny_tokenizer)
    argv = (
        "--checkpoint",
        tmp_path / "hf",
        *_prompts(*PROMPTS),
        "--max_new_tokens",
        16,
        "--temperature",
        1.5,
        "--top_k",
        20,
        "--top_p",
        0.9,
    )
    first = _generate(capsys, *argv, "--seed", 3)
    assert _generate(capsys, *argv, "--seed", 3) == first
    assert [r["completion_ids"] for r in _generate(capsys, *argv, "--seed", 4)] != [r["completion_ids"] for r in first]
    for result in first:
        prompt, completion = result["prompt_ids"], result["completion_ids"]
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
        chosen = torch.tensor(completion)[:, None]
        expected = logits.log_softmax(-1).gather(-1, chosen)[:, 0]
        torch.testing.assert_close(torch.tensor(result["logprobs"]), expected, rtol=0, atol=1e-4)
        assert bool(((logits > logits.gather(-1, chosen)).sum(-1) < 20).all()), "a token outside the top 20"


def test_a_dcp_checkpoint_generates_what_the_hf_folder_with_its_weights_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokenizer = write_tiny_tokenizer(tmp_path / "tokenizer")
    hf = _hf_folder(tmp_path / "hf", LLAMA32, seed=3, tokenizer=tokenizer)
    model = Transformer(LLAMA32)
    model.load_state_dict(from_hf_state_dict(hf.state_dict()))
    _save_checkpoint(tmp_path / "step-5", model, ModelSpec("llama3", LLAMA32, tokenizer_path=str(tokenizer)))
    shutil.rmtree(tmp_path / "tokenizer")  # the checkpoint's own copy must do

    sampled = (
        *_prompts(*PROMPTS),
        "--max_new_tokens",
        16,
        "--temperature",
        0.9,
        "--top_k",
        50,
        "--top_p",
        0.95,
        "--seed",
        7,
    )
    from_hf = _generate(capsys, "--checkpoint", tmp_path / "hf", *sampled)
    from_dcp = _generate(capsys, "--checkpoint", tmp_path / "step-5", *sampled)
    assert [r["prompt_ids"] for r in from_dcp] == [r["prompt_ids"] for r in from_hf]
    _assert_same(from_dcp, from_hf)


# ---- chat ----------------------------------------------------------------------------------


def test_llama3_chat_prompt_equals_transformers_with_the_official_template(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], llama3_path: Path, llama3_hf_tokenizer
) -> None:
    args = ModelArgs(
        dim=16,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        ffn_dim=32,
        vocab_size=128256,
        rope_theta=500000.0,
        tie_embeddings=True,
    )
    hf_llama(args, seed=0, bos_id=128000, eos_id=128009).save_pretrained(tmp_path / "hf")
    shutil.copy(llama3_path, tmp_path / "hf" / "tokenizer.model")
    prompts = ("  What is 2+2? ", "Hi")  # the format strips each message
    results = _generate(
        capsys,
        "--checkpoint",
        tmp_path / "hf",
        "--chat",
        "--system",
        "Be brief.",
        *_prompts(*prompts),
        "--temperature",
        0,
        "--max_new_tokens",
        3,
    )
    for prompt, result in zip(prompts, results):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
        assert result["prompt_ids"] == llama3_hf_tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=False
        )


def test_llama3_conversation_ids_and_assistant_spans(llama3_path: Path, llama3_hf_tokenizer) -> None:
    tok = build_tokenizer(str(llama3_path))
    chat = render_chat(tok, "llama3", CONVERSATION)
    assert chat.ids == llama3_hf_tokenizer.apply_chat_template(CONVERSATION, return_dict=False)
    ((start, end),) = chat.assistant_spans
    assert tok.decode(chat.ids[start:end]) == "It is blue.<|eot_id|>"
    assert tok.decode(chat.ids[:start]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_internlm2_chat_prompt_equals_transformers_with_the_official_template(
    tmp_path: Path, tiny_tokenizer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    transformers = pytest.importorskip("transformers")
    model = Transformer(LLAMA30)
    model.init_weights(seed=4)
    _save_checkpoint(tmp_path / "ckpt", model, ModelSpec("internlm2", LLAMA30, tokenizer_path=str(tiny_tokenizer)))
    prompts = ("What is the colour of the sky?", "Hello")
    results = _generate(
        capsys, "--checkpoint", tmp_path / "ckpt", "--chat", "--system", "Be brief.", *_prompts(*prompts), *GREEDY
    )

    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_tokenizer.parent)
    for prompt, result in zip(prompts, results):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
        assert result["prompt_ids"] == hf_tok.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=False
        )
    tok = build_tokenizer(str(tiny_tokenizer))
    chat = render_chat(tok, "internlm2", CONVERSATION)
    assert chat.ids == hf_tok.apply_chat_template(CONVERSATION, return_dict=False)
    ((start, end),) = chat.assistant_spans
    assert tok.decode(chat.ids[start:end]) == "It is blue.<|im_end|>"


def test_internlm_v1_chat_prompt_is_the_alpaca_template_prompt(
    tmp_path: Path, tiny_tokenizer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _hf_folder(tmp_path / "hf", LLAMA30, seed=5, tokenizer=tiny_tokenizer)
    (plain, with_system) = (
        _generate(
            capsys,
            "--checkpoint",
            tmp_path / "hf",
            "--chat",
            "--chat_format",
            "internlm",
            *extra,
            "--prompt",
            "What is blue?",
            *GREEDY,
        )[0]
        for extra in ((), ("--system", "Be brief."))
    )
    tok = build_tokenizer(str(tiny_tokenizer))
    assert plain["prompt_ids"] == tok.encode("<|User|>:What is blue?<eoh>\n<|Bot|>:", bos=True, eos=False)
    assert with_system["prompt_ids"] == tok.encode(
        "<|System|>:Be brief.\n<|User|>:What is blue?<eoh>\n<|Bot|>:", bos=True, eos=False
    )
    chat = render_chat(tok, "internlm", CONVERSATION[1:3])
    ((start, end),) = chat.assistant_spans
    assert tok.decode(chat.ids[start:end]) == "It is blue.<eoa>\n"


# ---- vocabulary, context and input files ---------------------------------------------------

# The debug flavors' vocabulary (2048 ids), which the demo tokenizer (512 pieces) does not fill.
DEMO_SIZED = replace(LLAMA30, vocab_size=2048, max_seq_len=64)


def _demo_checkpoint(folder: Path, demo_tokenizer: str, seed: int = 0) -> Path:
    """A DCP checkpoint of a 2048-id model recording the 512-piece demo tokenizer, as a debug run saves."""
    model = Transformer(DEMO_SIZED)
    model.init_weights(seed=seed)
    _save_checkpoint(folder, model, ModelSpec("llama3", DEMO_SIZED, tokenizer_path=demo_tokenizer))
    return folder


def test_ids_the_tokenizer_cannot_decode_are_never_sampled_and_the_sizes_are_said_once(
    tmp_path: Path, demo_tokenizer: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """With random weights 3 ids in 4 lie beyond the tokenizer: at temperature 1 one is sure to come up."""
    checkpoint = _demo_checkpoint(tmp_path / "step-1", demo_tokenizer)
    argv = [
        "--checkpoint",
        checkpoint,
        *_prompts("Once upon a time", "The"),
        "--temperature",
        1,
        "--max_new_tokens",
        24,
    ]
    assert main([str(arg) for arg in argv]) == 0
    out, err = capsys.readouterr()
    assert out.count("### Completion") == 2
    assert err.count("ids 512 and above are never sampled") == 1
    assert "the model has 2048 token ids and its tokenizer 512" in err
    for result in _generate(capsys, *argv, "--seed", 1):
        assert result["completion_ids"] and max(result["completion_ids"]) < 512


def test_a_prompt_longer_than_the_context_is_refused_unless_allow_overflow_keeps_its_end(
    tmp_path: Path, demo_tokenizer: str, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = _demo_checkpoint(tmp_path / "step-1", demo_tokenizer)
    text = " ".join(f"word{i}" for i in range(100))
    ids = build_tokenizer(demo_tokenizer).encode(text, bos=True, eos=False)
    assert len(ids) > DEMO_SIZED.max_seq_len
    argv = ["--checkpoint", str(checkpoint), "--prompt", "hi", "--prompt", text, "--max_new_tokens", "2"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        f"error: prompt 2 has {len(ids)} tokens, more than the model's context of 64 positions; shorten it, or "
        "pass --allow_overflow to keep its last 64 tokens\n"
    )

    results = _generate(capsys, *argv, "--allow_overflow", "--temperature", 0)
    assert [r["prompt_ids"] for r in results][1] == ids[-64:]
    assert len(results) == 2 and all(r["completion_ids"] for r in results)
    assert main([*argv, "--allow_overflow"]) == 0
    assert f"prompt 2 has {len(ids)} tokens, more than the model's context of 64 positions: kept its last 64" in (
        capsys.readouterr().err
    )


def test_a_byte_order_mark_in_the_prompts_file_is_not_part_of_the_prompt(
    tmp_path: Path, tiny_tokenizer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _hf_folder(tmp_path / "hf", LLAMA30, seed=0, tokenizer=tiny_tokenizer)
    (tmp_path / "prompts.txt").write_text("What\nthe cat\n", encoding="utf-8-sig")
    results = _generate(capsys, "--checkpoint", tmp_path / "hf", "--prompts_file", tmp_path / "prompts.txt", *GREEDY)
    tok = build_tokenizer(str(tiny_tokenizer))
    assert [r["prompt"] for r in results] == ["What", "the cat"]
    assert [r["prompt_ids"] for r in results] == [tok.encode(p, bos=True, eos=False) for p in ("What", "the cat")]


def test_help_shows_each_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal's width
    for default in (
        "(default: 128)",
        "(default: 0.7)",
        "(default: 0, all)",
        "(default: 1.0, all)",
        "seed of the sampling (default: 0)",
        "(default: 16)",
        "(default: auto)",
        "(default: the model family's)",
        "(default: the checkpoint's)",
    ):
        assert default in shown, default


# ---- errors --------------------------------------------------------------------------------


def _trainer_checkpoint_folder(tmp_path: Path, tokenizer: Path) -> list[str]:
    for step in (3, 12, 7):
        (tmp_path / "checkpoint" / f"step-{step}").mkdir(parents=True)
    return ["--checkpoint", str(tmp_path / "checkpoint")]


def _without_tokenizer(tmp_path: Path, tokenizer: Path) -> list[str]:
    hf_llama(LLAMA30, seed=0).save_pretrained(tmp_path / "hf")
    return ["--checkpoint", str(tmp_path / "hf")]


def _old_checkpoint(tmp_path: Path, tokenizer: Path) -> list[str]:
    dcp.save({"model": Transformer(LLAMA30).state_dict()}, checkpoint_id=tmp_path / "step-1", no_dist=True)
    return ["--checkpoint", str(tmp_path / "step-1")]


def _chat_without_specials(tmp_path: Path, tokenizer: Path) -> list[str]:
    _hf_folder(tmp_path / "hf", LLAMA30, seed=0, tokenizer=tokenizer)
    return ["--checkpoint", str(tmp_path / "hf"), "--chat"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp, tok: ["--checkpoint", str(tmp / "absent")], "absent is not an existing folder"),
        (lambda tmp, tok: ["--checkpoint", str(tmp)], "is neither a Hugging Face model folder"),
        (_trainer_checkpoint_folder, "it holds trainer checkpoints: pass one, e.g. "),
        (_without_tokenizer, "hf has no tokenizer (tokenizer.json or tokenizer.model"),
        (_old_checkpoint, "step-1 has no titanlm_model.json"),
        (_chat_without_specials, "the llama3 chat format needs the special token <|begin_of_text|>"),
    ],
    ids=[
        "missing-folder",
        "not-a-model-folder",
        "trainer-checkpoint-folder",
        "no-tokenizer",
        "old-checkpoint-without-flags",
        "chat-tokens",
    ],
)
def test_bad_input_gives_one_error_line_and_status_2(
    tmp_path: Path, tiny_tokenizer: Path, capsys: pytest.CaptureFixture[str], make, message: str
) -> None:
    argv = make(tmp_path, tiny_tokenizer)
    capsys.readouterr()  # save_pretrained's progress bars
    assert main([*argv, "--prompt", "hi"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and message in err
    if "trainer checkpoints" in message:
        assert err.rstrip().endswith("step-12")


@pytest.mark.slow
def test_the_module_runs_and_reports_errors_without_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "titanlm.tools.generate", "--checkpoint", str(tmp_path / "absent"), "--prompt", "hi"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: --checkpoint {tmp_path / 'absent'} is not an existing folder; pass a Hugging Face model folder "
        "or a titanlm checkpoint folder"
    ]
