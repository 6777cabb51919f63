"""`mamba2-aot export` and `mamba2-aot verify`: plugin commands the runtime CLI loads by name."""

from __future__ import annotations

import time
from pathlib import Path

import click

from runtime.errors import ExportError

from runtime.format.manifest import PLATFORMS, Limits

from exporter.artifact import PREFILL_SEGMENT
from exporter.config import ConfigError, load_config
from exporter.functions import ModelFunctions
from exporter.lowering import resolve_dtype


def _positive(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter("must be a positive integer")
    return value


@click.command("export")
@click.option("--model", "model", required=True,
              help="Preset (130m, 370m, 780m, 1.3b, 2.7b), a HF checkpoint directory or its config.json.")
@click.option("--platform", "platforms", multiple=True, type=click.Choice(PLATFORMS), default=("cpu",),
              show_default=True, help="Target backend; repeat for several.")
@click.option("--out", type=click.Path(path_type=Path), help="Artifact directory [default: artifacts/<model>].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]),
              help="Weights/activations dtype [default: float32 for cpu, bfloat16 for cuda/rocm/tpu].")
@click.option("--format", "fmt", type=click.Choice(["jax", "savedmodel"]), default="jax", show_default=True,
              help="jax: jax.export artifact (weights are arguments). savedmodel: TF Serving SavedModel "
                   "through jax2tf (weights bound as variables).")
@click.option("--weights",
              help="With --format savedmodel: checkpoint to bind, or `random` for seeded random weights "
                   "[default: the --model checkpoint dir].")
@click.option("--version", "sm_version", default=1, show_default=True, callback=_positive, type=int,
              help="With --format savedmodel: the TF Serving version directory.")
@click.option("--max-new-tokens", default=Limits.max_new_tokens, show_default=True, callback=_positive,
              type=int, help="New tokens one request may ask for (decoded decode-block tokens per device call).")
@click.option("--decode-block", default=Limits.decode_block, show_default=True, callback=_positive, type=int,
              help="Tokens one decode call makes at most (its output width; a savedmodel's most new tokens).")
@click.option("--max-batch", default=Limits.max_batch, show_default=True, callback=_positive, type=int)
@click.option("--max-prompt-tokens", default=Limits.max_prompt_tokens, show_default=True, callback=_positive,
              type=int, help="Prompt tokens one request may carry (prefilled in segments).")
@click.option("--max-prefill-tokens", default=Limits.max_prefill_tokens, show_default=True, callback=_positive,
              type=int, help="Batch x length of one prefill call: bounds its memory (inspect states it).")
@click.option("--prefill-segment", default=PREFILL_SEGMENT, show_default=True, callback=_positive, type=int,
              help="The longest prefill call for one row (the largest prompt bucket).")
@click.option("--max-stop-tokens", default=Limits.max_stop_tokens, show_default=True, callback=_positive, type=int)
@click.option("--devices", default=1, show_default=True, callback=_positive, type=int,
              help="Tensor-parallel over this many devices (mesh axis 'model'); the runtime needs exactly as many.")
@click.option("--force", is_flag=True, help="Replace an existing artifact.")
def export_command(model, platforms, out, dtype, fmt, weights, sm_version, max_new_tokens, decode_block,
                   max_batch, max_prompt_tokens, max_prefill_tokens, prefill_segment, max_stop_tokens,
                   devices, force):
    """Lower prefill and the on-device decode loop to jax.export artifacts (no weights needed)."""
    from exporter.artifact import write_artifact

    try:
        cfg = load_config(model)
    except ConfigError as e:
        raise ExportError(str(e)) from None
    platforms = tuple(dict.fromkeys(platforms))
    dt = resolve_dtype(dtype, platforms)
    limits = Limits(vocab_size=cfg.vocab_size, max_batch=max_batch, max_prompt_tokens=max_prompt_tokens,
                    max_new_tokens=max_new_tokens, max_stop_tokens=max_stop_tokens,
                    decode_block=min(decode_block, max_new_tokens), max_prefill_tokens=max_prefill_tokens)
    if fmt == "savedmodel":
        from exporter.savedmodel import export_savedmodel

        if devices > 1:
            raise ExportError("--devices applies to jax artifacts only: drop it with --format savedmodel")
        from exporter.loading import checkpoint_dir

        export_savedmodel(model, str(weights) if weights is not None else checkpoint_dir(model),
                          out or Path("artifacts") / f"{cfg.name}-savedmodel", sm_version, force,
                          echo=click.echo, dtype=dt, limits=limits, platforms=platforms)
        return
    if weights is not None:
        raise ExportError("--weights is for --format savedmodel: jax artifacts take weights at run time")
    out = out or Path("artifacts") / cfg.name
    click.echo(f"exporting {cfg.name} ({cfg.num_hidden_layers} layers, d_model {cfg.hidden_size}) "
               f"as {dt.name} for {', '.join(platforms)} -> {out}")
    if devices > 1:
        from exporter.sharding import fallback_summary, plan

        click.echo(f"  tensor parallel over {devices} devices (mesh model={devices})")
        for line in fallback_summary(plan(cfg, devices, dt)):
            click.echo(f"  replicated instead: {line}")
    rows = []

    def progress(platform, name, size, seconds):
        rows.append((platform, name, size, seconds))
        click.echo(f"  [{platform}] {name:<8} {size / 1e3:9.1f} kB  {seconds:6.2f} s")

    t0 = time.perf_counter()
    manifest = write_artifact(ModelFunctions(cfg, dt, limits, devices), platforms, out, force, progress,
                              prefill_segment)
    total = sum(r["bytes"] for r in manifest["files"].values())
    click.echo(f"wrote {len(manifest['files'])} files + manifest.json, {total / 1e6:.2f} MB, "
               f"in {time.perf_counter() - t0:.1f} s: {out}")


@click.command("verify")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--weights", default="random", show_default=True,
              help="HF checkpoint dir, .safetensors file or orbax checkpoint; `random`: seeded random "
                   "weights (a comparison of the two paths needs no real ones).")
@click.option("--steps", default=64, show_default=True, callback=_positive, type=int,
              help="Greedy decode steps to compare.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for prompts and random weights.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify_command(artifact, weights, steps, seed, as_json):
    """Run the artifact and the live JAX model on the same prompts and compare them."""
    import dataclasses
    import json

    import warnings

    from runtime.engine.model import load
    from runtime.errors import Mamba2AOTWarning
    from runtime.tools.generate_cmd import weights_arg

    from exporter.verify import verify

    with warnings.catch_warnings():  # random weights are verify's default: the line below says so
        warnings.filterwarnings("ignore", "using seeded random weights", Mamba2AOTWarning)
        loaded = load(artifact, weights_arg(weights), seed=seed)
    if not as_json:
        click.echo(f"weights: {loaded.weights_source}")
    report = verify(loaded, steps=steps, seed=seed)
    if as_json:
        click.echo(json.dumps({**dataclasses.asdict(report), "ok": report.ok}))
    else:
        tol = report.tolerance
        rows = [
            ("prompts (ragged batch)", ", ".join(map(str, report.prompt_lengths)) + " tokens", ""),
            ("prefill logits max abs diff", f"{report.logits_max_abs:.3e}", ""),
            ("prefill logits max rel diff", f"{report.logits_max_rel:.3e}", f"<= {tol:g}"),
            (f"greedy tokens, {report.steps} steps", "all agree" if report.tokens_agree
             else f"differ from step {report.first_disagreement}", "all agree"),
            ("final cache max abs diff", f"{report.cache_max_abs:.3e}", ""),
            ("final cache max rel diff", f"{report.cache_max_rel:.3e}", f"<= {tol:g}"),
        ]
        for name, value, limit in rows:
            click.echo(f"  {name:<30} {value:<28} {limit}")
        click.echo("verify: OK" if report.ok else "verify: FAILED")
    raise SystemExit(0 if report.ok else 1)
