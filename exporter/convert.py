"""`mamba2-aot convert-checkpoint SRC OUT`: official checkpoints (mamba_ssm, mistral) to HF format."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("convert-checkpoint")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace an existing OUT.")
def convert_checkpoint_command(src, out, force):
    """Convert SRC (a mamba_ssm checkpoint dir, a pytorch_model.bin, a sharded .bin set's index, or
    mistral's params.json + consolidated.safetensors dir) into an HF-format checkpoint at OUT
    (a mamba_ssm hybrid: its own config.json and tensor names, in safetensors).

    Pickled weights are read by a restricted reader that can only build tensors (it never runs
    code from the file); OUT is written atomically."""
    from exporter.conversion import convert_checkpoint

    done = convert_checkpoint(src, out, force=force)
    click.echo(f"converted {done.kind} checkpoint {src} -> {out}: {done.tensors} tensors, "
               f"{done.bytes / 1e9:.2f} GB ({', '.join(done.dtypes)}); {done.summary}")
    if "tokenizer.json" in done.tokenizer_files:
        click.echo(f"  tokenizer: {', '.join(done.tokenizer_files)}")
    else:
        click.echo("  no tokenizer.json in SRC: pass one to generate with --tokenizer PATH "
                   "(state-spaces checkpoints use GPT-NeoX's, EleutherAI/gpt-neox-20b)")
