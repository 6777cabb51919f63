"""`mamba2-aot convert-weights`: a checkpoint (or seeded random weights) to an orbax checkpoint."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("convert-weights")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--weights", help="HF checkpoint dir or .safetensors file; `random`: seeded random weights "
                               "(--seed). Required.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--force", is_flag=True, help="Replace an existing OUT.")
def convert_command(artifact, out, weights, seed, force):
    """Write the weights ARTIFACT needs, checked and cast to its dtype, as an orbax checkpoint at OUT."""
    from runtime.engine.weights import load_weights, parse_weight_spec
    from runtime.errors import WeightsError
    from runtime.format.manifest import read_manifest
    from runtime.tools.random_init import random_weights
    from runtime.tools.writers import save_orbax

    manifest = read_manifest(artifact)
    spec = parse_weight_spec(manifest.weights)
    if weights is None:
        raise WeightsError("no --weights given: pass the checkpoint to convert, or --weights random for seeded "
                           "random weights")
    if weights == "random":
        click.echo(f"warning: writing seeded random weights (seed {seed}), as asked: they are meaningless",
                   err=True)
        params = random_weights(spec, seed)
    else:
        params = load_weights(Path(weights), spec)
    save_orbax(params, out, config=spec.config_match, force=force)
    total = sum(a.nbytes for a in params.values())
    click.echo(f"wrote {len(params)} tensors, {total / 1e6:.1f} MB ({manifest.dtype}) to {out}")
