"""`mamba2-aot generate`: run an artifact on prompts, optionally streaming."""

from __future__ import annotations

import json
from pathlib import Path

import click

from runtime.errors import RequestError

WEIGHTS_HELP = ("HF checkpoint dir, .safetensors file or orbax checkpoint; `random`: seeded random weights "
                "(--seed), whose outputs are meaningless.")


def weights_arg(value: str | None):
    """--weights as runtime.load takes it: None, "random", or a Path."""
    return value if value in (None, "random") else Path(value)


def _ids(values: tuple[str, ...]) -> list[list[int]]:
    rows = []
    for v in values:
        try:
            rows.append([int(t) for t in v.replace(" ", "").split(",") if t != ""])
        except ValueError:
            raise RequestError(f"--prompt-ids {v!r} is not a comma-separated list of integers") from None
    return rows


def _tokenizer(weights, tokenizer: Path | None):
    """--tokenizer (a tokenizer.json or a directory holding one), else the checkpoint's
    tokenizer.json, loaded with HF `tokenizers`."""
    if tokenizer is not None:
        path = tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer
        if not path.is_file():
            raise RequestError(f"--tokenizer {tokenizer}: no such file" if not tokenizer.exists() else
                               f"--tokenizer {tokenizer}: no tokenizer.json in that directory")
    else:
        checkpoint = isinstance(weights, Path)  # not None, not "random"
        path = (weights if weights.is_dir() else weights.parent) / "tokenizer.json" if checkpoint else None
        if path is None or not path.is_file():
            where = f"no tokenizer.json beside {weights}" if checkpoint else "no checkpoint given"
            raise RequestError(f"--prompt needs the checkpoint's tokenizer.json ({where}): pass --tokenizer PATH "
                               "or --prompt-ids instead")
    from runtime.extras import optional_import

    tokenizers = optional_import("tokenizers", RequestError)
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own types
        raise RequestError(f"cannot read {path}: {e}") from e


def _check_request(artifact, prompts, max_new_tokens, temperature, top_k, top_p, min_p, stop_ids, seed,
                   block):
    """Refuse a bad request from the manifest alone, before reading weights or compiling (the
    same checks `LoadedModel.stream` makes)."""
    import dataclasses

    from runtime.engine.requests import SamplingParams, check_new_tokens, check_prompts, check_stop_ids
    from runtime.format.manifest import read_manifest

    limits = dataclasses.asdict(read_manifest(artifact).limits)
    check_prompts(prompts, limits)
    if max_new_tokens is not None:
        check_new_tokens(max_new_tokens, limits)
    SamplingParams(temperature, top_k, top_p, min_p).check()
    check_stop_ids(list(stop_ids) or None, limits)
    if seed < 0:
        raise RequestError(f"seed must be an integer >= 0 or a list of {len(prompts)} of them")
    if block < 1:
        raise RequestError(f"block must be a positive integer, got {block!r}")


@click.command("generate")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--weights", help=WEIGHTS_HELP + " Required.")
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
    weights = weights_arg(weights)
    tokenizer = _tokenizer(weights, tokenizer_path) if texts or tokenizer_path is not None else None
    prompts = [tokenizer.encode(t).ids for t in texts] if texts else _ids(id_lists)
    _check_request(artifact, prompts, max_new_tokens, temperature, top_k, top_p, min_p, stop_ids, seed,
                   block if stream else 1)
    # Compiles for this request's size while the weights load. Its warnings (an expired artifact,
    # random weights, the compile cache) are `warning:` lines (runtime.tools.cli).
    model = load(artifact, weights, seed=seed, prepare=[(len(prompts), max(map(len, prompts)))])
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
