"""`mamba2-aot serve`: an artifact behind an OpenAI-compatible HTTP API (needs the `serve` extra)."""

from __future__ import annotations

from pathlib import Path

import click

from runtime.errors import Mamba2AOTError
from runtime.tools.generate_cmd import WEIGHTS_HELP, weights_arg

_EXTRAS = ("fastapi", "uvicorn", "prometheus_client")  # jinja2: only for a chat template


def _importable(name: str) -> bool:
    import importlib

    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _check_extras() -> None:
    missing = [m for m in _EXTRAS if not _importable(m)]
    if missing:
        raise Mamba2AOTError(f"serve needs {', '.join(missing)}: pip install 'mamba2-aot[serve]'")


@click.command("serve")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--weights", required=True, help=WEIGHTS_HELP)
@click.option("--tokenizer", type=click.Path(path_type=Path),
              help="A tokenizer.json or a directory holding one (and tokenizer_config.json with the chat "
                   "template) [default: the checkpoint's; none: prompts must be token ids].")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--slots", default=8, show_default=True, type=int,
              help="Sequences decoding together (a batch bucket of the artifact).")
@click.option("--block", default=16, show_default=True, type=int,
              help="Tokens per decode call: one streamed chunk per block; new requests join between blocks.")
@click.option("--max-queue", default=256, show_default=True, type=int,
              help="Sequences that may wait for a slot; beyond that, 429.")
@click.option("--prefill-chunk", default=1024, show_default=True, type=int,
              help="Prompt tokens (batch x length) of one admission prefill call, between decode blocks.")
@click.option("--prefix-cache-mb", default=0.0, show_default=True, type=float,
              help="MiB of states kept by token history (0: off).")
@click.option("--api-key", envvar="MAMBA2_AOT_API_KEY", help="Require `Authorization: Bearer KEY` on /v1 "
              "routes [env MAMBA2_AOT_API_KEY].")
@click.option("--served-model-name", help="The model name clients use [default: the artifact's directory name].")
@click.option("--max-body-bytes", default=16 << 20, show_default=True, type=int, help="Larger bodies: 413.")
@click.option("--request-timeout", default=600.0, show_default=True, type=float,
              help="Seconds from arrival to the last token; 0: none.")
@click.option("--drain-timeout", default=30.0, show_default=True, type=float,
              help="Seconds SIGTERM waits for requests in flight.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of random weights (no --weights).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def serve_command(artifact, weights, tokenizer, host, port, slots, block, max_queue, prefill_chunk,
                  prefix_cache_mb, api_key, served_model_name, max_body_bytes, request_timeout, drain_timeout,
                  seed, log_level):
    """Serve ARTIFACT over OpenAI's API with continuous batching over state slots."""
    _check_extras()
    from runtime.format.manifest import read_manifest
    from runtime.serve.app import create_app
    from runtime.serve.config import ServeConfig
    from runtime.serve.server import run
    from runtime.serve.service import Service
    from runtime.serve.text import TextModel, find_tokenizer

    weights = weights_arg(weights)
    config = ServeConfig(artifact=artifact, weights=weights, tokenizer=tokenizer, host=host, port=port, slots=slots,
                         block=block, max_queue=max_queue, prefill_chunk=prefill_chunk,
                         prefix_cache_mb=prefix_cache_mb, api_key=api_key or None, model_name=served_model_name,
                         max_body_bytes=max_body_bytes, request_timeout=request_timeout or None,
                         drain_timeout=drain_timeout, seed=seed)
    manifest = read_manifest(artifact)  # a bad artifact fails here, before the port is taken
    config.check(manifest)
    found = find_tokenizer(tokenizer, weights)
    text = TextModel(found, manifest.limits.vocab_size) if found is not None else None
    service = Service(config, manifest, text)
    run(create_app(service), service, host, port, drain_timeout, log_level)
