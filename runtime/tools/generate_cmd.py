"""`mamba2-aot generate`: run an artifact on prompts, optionally streaming."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import click

from runtime.errors import RequestError


def _ids(values: tuple[str, ...]) -> list[list[int]]:
    rows = []
    for v in values:
        try:
            rows.append([int(t) for t in v.replace(" ", "").split(",") if t != ""])
        except ValueError:
            raise RequestError(f"--prompt-ids {v!r} is not a comma-separated list of integers") from None
    return rows


def _tokenizer(weights: Path | None, tokenizer: Path | None):
    """--tokenizer (a tokenizer.json or a directory holding one), else the checkpoint's
    tokenizer.json, loaded with HF `tokenizers`."""
    if tokenizer is not None:
        path = tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer
        if not path.is_file():
            raise RequestError(f"--tokenizer {tokenizer}: no such file" if not tokenizer.exists() else
                               f"--tokenizer {tokenizer}: no tokenizer.json in that directory")
    else:
        path = None if weights is None else (weights if weights.is_dir() else weights.parent) / "tokenizer.json"
        if path is None or not path.is_file():
            where = "no --weights given" if weights is None else f"no tokenizer.json beside {weights}"
            raise RequestError(f"--prompt needs the checkpoint's tokenizer.json ({where}): pass --tokenizer PATH "
                               "or --prompt-ids instead")
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise RequestError(f"cannot read {path}: {e}") from None


def _check_request(artifact, prompts, max_new_tokens, temperature, top_k, top_p, min_p):
    """Refuse a bad request from the manifest alone, before reading weights or compiling."""
    import dataclasses

    from runtime.format.manifest import read_manifest
    from runtime.engine.requests import SamplingParams, check_new_tokens, check_prompts

    limits = dataclasses.asdict(read_manifest(artifact).limits)
    check_prompts(prompts, limits)
    if max_new_tokens is not None:
        check_new_tokens(max_new_tokens, limits)
    SamplingParams(temperature, top_k, top_p, min_p).check()


@click.command("generate")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--weights", type=click.Path(path_type=Path),
              help="HF checkpoint dir, .safetensors file or orbax checkpoint [default: seeded random].")
@click.option("--prompt", "texts", multiple=True,
              help="Prompt text (needs --tokenizer or the checkpoint's tokenizer.json).")
@click.option("--prompt-ids", "id_lists", multiple=True, help="Comma-separated token ids; repeat for a batch.")
@click.option("--max-new-tokens", type=int, help="[default: 64, or the artifact's cap if smaller]")
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=int, help="0 = off.")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="1 = off.")
@click.option("--min-p", default=0.0, show_default=True, type=float, help="0 = off; relative to the top token.")
@click.option("--seed", default=0, show_default=True, type=int, help="Sampling seed (and random-weights seed).")
@click.option("--stop-id", "stop_ids", multiple=True, type=int,
              help="Another stop token id (repeat for several); the model's eos id always stops unless --ignore-eos.")
@click.option("--ignore-eos", is_flag=True, help="Do not stop at the model's eos id (benchmarks).")
@click.option("--stream", is_flag=True, help="Print tokens block by block as they are made.")
@click.option("--block", default=16, show_default=True, type=int, help="Tokens per device call when streaming.")
@click.option("--json", "as_json", is_flag=True, help='Print {"tokens": [[...], ...]}: new tokens per prompt.')
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path),
              help="A tokenizer.json (or a directory holding one) for checkpoints that ship none; "
                   "encodes --prompt and decodes the output [default: the checkpoint's].")
def generate_command(artifact, weights, texts, id_lists, max_new_tokens, temperature, top_k, top_p,
                     min_p, seed, stop_ids, ignore_eos, stream, block, as_json, tokenizer_path):
    """Generate from ARTIFACT with the compiled prefill and on-device decode loop."""
    from runtime.engine.model import load

    if bool(texts) == bool(id_lists):
        raise RequestError("give prompts with either --prompt or --prompt-ids (not both, not neither)")
    tokenizer = _tokenizer(weights, tokenizer_path) if texts or tokenizer_path is not None else None
    prompts = [tokenizer.encode(t).ids for t in texts] if texts else _ids(id_lists)
    _check_request(artifact, prompts, max_new_tokens, temperature, top_k, top_p, min_p)
    # Compiles for this request's size while the weights load.
    with warnings.catch_warnings():  # the expiry warning is shown below as one `warning:` line
        warnings.filterwarnings("ignore", "artifact passed its compatibility date", RuntimeWarning)
        model = load(artifact, weights, seed=seed, prepare=[(len(prompts), max(map(len, prompts)))])
    for message in model.warnings:
        click.echo(f"warning: {message}", err=True)
    if weights is None:
        click.echo(f"note: no --weights given: using {model.weights_source}; outputs are meaningless",
                   err=True)
    if max_new_tokens is None:
        max_new_tokens = min(64, model.limits["max_new_tokens"])
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
              stop=list(stop_ids), ignore_eos=ignore_eos)
    if stream and not as_json:
        for gen in model.stream(prompts, max_new_tokens, block=block, **kw):
            for i, row in enumerate(gen.tokens):
                if row:
                    text = tokenizer.decode(row) if tokenizer else " ".join(map(str, row))
                    click.echo(f"[{i}] {text}")
        return
    rows = model.generate(prompts, max_new_tokens, **kw)
    if as_json:
        click.echo(json.dumps({"tokens": rows}))
        return
    for i, row in enumerate(rows):
        click.echo(f"[{i}] " + (tokenizer.decode(row) if tokenizer else " ".join(map(str, row))))
