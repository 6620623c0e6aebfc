"""Sample from a trained or downloaded model, on one GPU or the CPU.

    python -m titanlm.tools.generate --checkpoint PATH --prompt "Once upon a time" [--prompt ...]
        [--prompts_file FILE] [--chat [--system TEXT]] [--max_new_tokens 128] [--temperature 0.7]
        [--top_k 0] [--top_p 1.0] [--seed 0] [--allow_overflow] [--json]

PATH is a Hugging Face model folder (config.json, safetensors, tokenizer files) or a titanlm DCP
checkpoint folder (a trainer's step-N or a `convert hf_to_dcp` output, saved under any parallel
layout: DCP reassembles the full tensors). The model and tokenizer come from the folder; older
checkpoints without a model record need --model.name/--model.flavor and --tokenizer_path.

A prompt longer than the model's context (its max_position_embeddings) is refused, or with
--allow_overflow cut to its last tokens that fit. Ids the tokenizer cannot decode (a debug flavor's
2048 ids beside the 512-piece demo tokenizer) are never sampled.

Decoding stops at the tokenizer's end-of-sequence and end-of-turn tokens (and the eos ids of a
generation_config.json beside the tokenizer) or after --max_new_tokens. With --json, each prompt
gives one JSON line: prompt, prompt_ids, completion, completion_ids (ending with the stop token
when one ended it; the completion text leaves it out), logprobs (the model's log-probability of
each completion token before temperature and filtering) and finish_reason ("stop" or "length").
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from titanlm.checkpoint import layout
from titanlm.checkpoint.layout import Kind
from titanlm.checkpoint.single_process import checked_checkpoint_spec, read_model_state
from titanlm.data.chat_templates import CHAT_FORMATS, END_OF_TURN, render_chat
from titanlm.data.tokenizer import Tokenizer, build_tokenizer
from titanlm.errors import TitanlmError
from titanlm.files import read_json_file, read_text_file
from titanlm.generation import Completion, Sampling, generate, inference_model
from titanlm.models import FLAVORS
from titanlm.models.hf_adapter import StateDict
from titanlm.models.hf_checkpoint import tokenizer_file
from titanlm.models.spec import ModelSpec, read_hf_folder
from titanlm.tools.common import run_cli

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class GenerateError(TitanlmError):
    """An input the tool cannot use; the message names it and the fix."""


def load_checkpoint(
    path: str, tokenizer_path: str = "", name: str | None = None, flavor: str | None = None
) -> tuple[ModelSpec, StateDict]:
    """The model of an HF folder or DCP checkpoint, with its tokenizer file (or `tokenizer_path`,
    a file or a folder holding one), and its full titanlm state dict in the stored dtype."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise GenerateError(
            f"--checkpoint {path} is not an existing folder; pass a Hugging Face model folder or a titanlm "
            "checkpoint folder"
        )
    kind = layout.classify(str(folder))
    if kind is Kind.DCP:
        spec, state = checked_checkpoint_spec(folder, name, flavor), read_model_state(folder)
    elif kind is Kind.HF:
        spec, state = read_hf_folder(folder, name, flavor)
    else:
        latest = layout.step_dir(str(folder), layout.complete_steps(str(folder))[-1]) if kind is Kind.RUN else None
        fix = f"it holds trainer checkpoints: pass one, e.g. {latest}" if latest else "point it at one of those"
        raise GenerateError(
            f"--checkpoint {path} is neither a Hugging Face model folder (no config.json) nor a titanlm DCP "
            f"checkpoint (no .metadata); {fix}"
        )
    return replace(spec, tokenizer_path=_tokenizer_path(tokenizer_path, spec, folder)), state


def _tokenizer_path(override: str, spec: ModelSpec, checkpoint: Path) -> str:
    if override:
        path = Path(override).expanduser()
        found = tokenizer_file(path) if path.is_dir() else path if path.is_file() else None
        if found is None:
            raise GenerateError(
                f"--tokenizer_path {override} is neither a tokenizer file nor a folder with tokenizer.json or "
                "tokenizer.model; point it at the model's tokenizer"
            )
        return str(found)
    if not spec.tokenizer_path:
        raise GenerateError(
            f"{checkpoint} has no tokenizer (tokenizer.json or tokenizer.model, or a tokenizer recorded in the "
            "checkpoint); pass --tokenizer_path with the model's tokenizer file or folder"
        )
    if not Path(spec.tokenizer_path).is_file():
        raise GenerateError(
            f"the tokenizer {spec.tokenizer_path} of {checkpoint} is missing; restore it or pass --tokenizer_path"
        )
    return spec.tokenizer_path


def stop_ids(tok: Tokenizer, tokenizer_path: str) -> set[int]:
    """eos, the end-of-turn tokens of the chat formats that the tokenizer has, and the eos ids of
    a generation_config.json beside the tokenizer (where a release lists all the ids it stops at)."""
    ids = {tok.eos_id} if tok.eos_id >= 0 else set()
    ids |= {i for i in map(tok.token_id, END_OF_TURN) if i is not None}
    config = Path(tokenizer_path).parent / "generation_config.json"
    if config.is_file():
        eos = read_json_file(config, GenerateError, "fix or remove it", expect=dict).get("eos_token_id")
        ids |= set(eos) if isinstance(eos, list) else {eos} if isinstance(eos, int) else set()
    return ids


def encode_prompts(tok: Tokenizer, texts: Sequence[str], chat_format: str = "", system: str = "") -> list[list[int]]:
    """Each text after BOS, or with `chat_format` as one user turn (after the `system` message)
    followed by the assistant's header."""
    if not chat_format:
        return [tok.encode(text, bos=True, eos=False) for text in texts]
    before = [{"role": "system", "content": system}] if system else []
    return [
        render_chat(tok, chat_format, [*before, {"role": "user", "content": text}], generation_prompt=True).ids
        for text in texts
    ]


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """`auto` device: cuda when there is one, else cpu; `auto` dtype: bfloat16 on cuda, float32 on cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        chosen = torch.device(device)
    except RuntimeError:
        chosen = None
    if chosen is None or chosen.type not in ("cpu", "cuda"):
        raise GenerateError(f"--device {device} is not a device generate runs on; use auto, cpu, cuda or cuda:N")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise GenerateError(f"--device {device}: this machine has no CUDA device; use --device cpu")
    if dtype == "auto":
        return chosen, torch.bfloat16 if chosen.type == "cuda" else torch.float32
    return chosen, DTYPES[dtype]


def _read_prompts(options: argparse.Namespace) -> list[str]:
    prompts = list(options.prompt)
    if options.prompts_file:
        path = Path(options.prompts_file).expanduser()
        if not path.is_file():
            raise GenerateError(
                f"--prompts_file {options.prompts_file} is not a file; pass a text file, one prompt a line"
            )
        prompts += [line for line in read_text_file(path, GenerateError).splitlines() if line.strip()]
    if not prompts:
        raise GenerateError("no prompt given; pass --prompt TEXT (repeatable) or --prompts_file FILE")
    return prompts


def _check_options(options: argparse.Namespace) -> None:
    if options.batch_size < 1:
        raise GenerateError(f"--batch_size {options.batch_size} must be at least 1")
    if (options.system or options.chat_format) and not options.chat:
        raise GenerateError("--system and --chat_format shape a chat prompt; add --chat")


def _checked_prompts(prompts: list[list[int]], spec: ModelSpec, allow_overflow: bool) -> list[list[int]]:
    """The prompts, each refused when the model cannot read it, or, when longer than the model's context,
    refused or (`allow_overflow`) cut to its last tokens that fit, with a warning."""
    context = spec.args.max_seq_len
    fitted = []
    for index, ids in enumerate(prompts):
        if not ids:
            raise GenerateError(f"prompt {index + 1} is empty and the tokenizer has no BOS to start from; give it text")
        if max(ids) >= spec.args.vocab_size:
            raise GenerateError(
                f"the tokenizer {spec.tokenizer_path} gives id {max(ids)}, beyond the model's vocabulary of "
                f"{spec.args.vocab_size}; pass the model's own tokenizer with --tokenizer_path"
            )
        if len(ids) > context:
            problem = f"prompt {index + 1} has {len(ids)} tokens, more than the model's context of {context} positions"
            if not allow_overflow:
                raise GenerateError(
                    f"{problem}; shorten it, or pass --allow_overflow to keep its last {context} tokens"
                )
            print(f"generate: {problem}: kept its last {context} (--allow_overflow)", file=sys.stderr)
            ids = ids[-context:]
        fitted.append(ids)
    return fitted


def _report(text: str, prompt_ids: list[int], completion: Completion, tok: Tokenizer, as_json: bool) -> str:
    reply = completion.ids[:-1] if completion.stopped else completion.ids
    if as_json:
        return json.dumps(
            {
                "prompt": text,
                "prompt_ids": prompt_ids,
                "completion": tok.decode(reply),
                "completion_ids": completion.ids,
                "logprobs": completion.logprobs,
                "finish_reason": "stop" if completion.stopped else "length",
            },
            ensure_ascii=False,
        )
    ending = "ended by a stop token" if completion.stopped else "cut at --max_new_tokens"
    return f"### Prompt\n{text}\n### Completion ({len(completion.ids)} tokens, {ending})\n{tok.decode(reply)}\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m titanlm.tools.generate",
        description="Sample completions from an HF model folder or a titanlm DCP checkpoint.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="Hugging Face model folder, or titanlm DCP checkpoint folder (with .metadata)",
    )
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    parser.add_argument(
        "--prompts_file", help="text file with one prompt a line, blank lines skipped; they follow any --prompt"
    )
    parser.add_argument(
        "--max_new_tokens",
        type=int,
        default=Sampling.max_new_tokens,
        help="most tokens to generate per prompt (default: %(default)s)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=Sampling.temperature,
        help="0 = greedy decoding (default: %(default)s)",
    )
    parser.add_argument(
        "--top_k",
        type=int,
        default=Sampling.top_k,
        help="sample among the k likeliest tokens; 0 = all (default: %(default)s, all)",
    )
    parser.add_argument(
        "--top_p",
        type=float,
        default=Sampling.top_p,
        help="sample among the likeliest tokens that together have probability top_p; 1 = all "
        "(default: %(default)s, all)",
    )
    parser.add_argument("--seed", type=int, default=Sampling.seed, help="seed of the sampling (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts decoded together (default: %(default)s)")
    parser.add_argument(
        "--allow_overflow",
        action="store_true",
        help="a prompt longer than the model's context keeps its last tokens that fit, with a warning, instead of "
        "being refused",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="wrap each prompt as a user turn of the model's chat format, then the assistant's header",
    )
    parser.add_argument("--system", default="", help="system message before each prompt (with --chat)")
    parser.add_argument(
        "--chat_format", choices=sorted(CHAT_FORMATS), help="chat format of --chat (default: the model family's)"
    )
    parser.add_argument("--tokenizer_path", default="", help="tokenizer file or folder (default: the checkpoint's)")
    parser.add_argument(
        "--model.name",
        dest="name",
        choices=sorted(FLAVORS),
        help="model family, for checkpoints without titanlm_model.json",
    )
    parser.add_argument(
        "--model.flavor",
        dest="flavor",
        help="flavor the checkpoint was trained as, for checkpoints without titanlm_model.json",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (cuda if available, else cpu), cpu, cuda or cuda:N (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="auto = bfloat16 on cuda, float32 on cpu (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt, one a line")
    return parser


@run_cli
def main(argv: Sequence[str] | None = None) -> int:
    """Generate for every prompt; bad input prints one line on stderr and exits with status 2."""
    options = _parser().parse_args(argv)
    _check_options(options)
    sampling = Sampling(options.max_new_tokens, options.temperature, options.top_k, options.top_p, options.seed)
    texts = _read_prompts(options)
    device, dtype = resolve_device(options.device, options.dtype)
    spec, state = load_checkpoint(options.checkpoint, options.tokenizer_path, options.name, options.flavor)
    tok = build_tokenizer(spec.tokenizer_path, setting="--tokenizer_path")
    chat_format = (options.chat_format or spec.family) if options.chat else ""
    prompts = _checked_prompts(encode_prompts(tok, texts, chat_format, options.system), spec, options.allow_overflow)
    if tok.vocab_size < spec.args.vocab_size:  # the debug flavors' 2048 ids with the 512-piece demo tokenizer
        print(
            f"generate: the model has {spec.args.vocab_size} token ids and its tokenizer {tok.vocab_size}; ids "
            f"{tok.vocab_size} and above are never sampled",
            file=sys.stderr,
        )
    stops = stop_ids(tok, spec.tokenizer_path)
    model = inference_model(spec.args, state, device, dtype)
    del state
    print(
        f"generate: {spec.family} model, {spec.args.n_layers} layers, dim {spec.args.dim}, on {device} in "
        f"{str(dtype).removeprefix('torch.')}; prompts: {len(prompts)}",
        file=sys.stderr,
    )
    for first in range(0, len(prompts), options.batch_size):
        batch = prompts[first : first + options.batch_size]
        completions = generate(model, batch, sampling, stops, max(tok.pad_id, 0), tok.vocab_size)
        for offset, completion in enumerate(completions):
            print(_report(texts[first + offset], batch[offset], completion, tok, options.json), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
