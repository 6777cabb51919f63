"""mamba_ssm, mistral and pickled HF checkpoints -> an HF-format directory (config.json in HF's
format, model.safetensors with HF names, the tokenizer files), written atomically. mamba_ssm's
hybrid checkpoints (attn_layer_idx / d_intermediate), which have no HF format, keep their
config.json and tensor names: only the pickle becomes safetensors, which `export` and the
runtime read as they are.

Sources: a directory (or its weights file) holding `pytorch_model.bin`, a sharded
`pytorch_model.bin.index.json` set, or mistral's `consolidated.safetensors` + `params.json`;
the config is that directory's `config.json` (mamba_ssm or HF) or `params.json`. Weights are
read through the restricted torch.save reader or memory-mapped safetensors, checked against
the model the config describes (every tensor, shape and float dtype) and streamed to the output
one tensor at a time, in their stored dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path

import numpy as np

from runtime.tools.atomic import atomic_directory
from runtime.engine.checkpoints import Checkpoint, open_checkpoint
from runtime.errors import ExportError, WeightsError

from exporter.config import ConfigError, Mamba2Config
from exporter.config_files import config_from_dict, is_mamba_ssm_config, to_hf_config
from exporter.hybrid_config import HybridConfig, from_mamba_ssm_hybrid, is_mamba_ssm_hybrid
from exporter.params import param_shapes
from exporter.safetensors_writer import dtype_code, write_safetensors
from exporter.torch_zip import open_torch_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "tokenizer.model.v3", "tekken.json")
_PICKLED = (".bin", ".pt", ".pth")
_MAX_LISTED = 5


@dataclasses.dataclass
class Source:
    """A checkpoint to convert: its config (already mapped) and its tensors (not yet read)."""

    directory: Path
    weights: Path
    kind: str  # "mamba_ssm", "mamba_ssm hybrid", "mistral" or "hf": the config's format
    config: Mamba2Config | HybridConfig
    checkpoint: Checkpoint
    tokenizer_files: list[Path]
    raw_config: dict  # the config file as read (a hybrid's is written out as it is)


def _find_weights(d: Path) -> Path:
    for name in ("pytorch_model.bin.index.json", "pytorch_model.bin"):
        if (d / name).is_file():
            return d / name
    if (d / "params.json").is_file() and (d / "consolidated.safetensors").is_file():
        return d / "consolidated.safetensors"
    pickled = sorted(f for f in d.iterdir() if f.suffix in _PICKLED and f.is_file())
    if len(pickled) == 1:
        return pickled[0]
    for name in ("model.safetensors.index.json", "model.safetensors"):
        if (d / name).is_file():
            return d / name
    raise WeightsError(f"{d} has no pytorch_model.bin, pytorch_model.bin.index.json or consolidated.safetensors "
                       f"+ params.json{f' (and {len(pickled)} .bin files: pass the one to convert)' if pickled else ''}")


def _read_config(d: Path, weights: Path) -> tuple[str, Mamba2Config | HybridConfig, dict]:
    name = "params.json" if weights.name == "consolidated.safetensors" and (d / "params.json").is_file() \
        else "config.json"
    path = d / name
    if not path.is_file():
        raise WeightsError(f"{d} has no config.json: convert-checkpoint needs the model's config beside its weights "
                           "(mamba_ssm's or HF's config.json, or mistral's params.json)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise WeightsError(f"{path} is not a JSON object")
    hybrid = name == "config.json" and is_mamba_ssm_hybrid(raw)
    try:
        cfg = from_mamba_ssm_hybrid(raw, name=d.resolve().name or "custom") if hybrid \
            else config_from_dict(raw, name=d.resolve().name or "custom", filename=name)
    except ConfigError as e:
        raise WeightsError(f"{path}: {e}") from None
    kind = "mamba_ssm hybrid" if hybrid else "mistral" if name == "params.json" \
        else "mamba_ssm" if is_mamba_ssm_config(raw) else "hf"
    return kind, cfg, raw


def open_source(src: Path) -> Source:
    """Find the weights and the config of a checkpoint directory (or of one of its files)."""
    if not src.exists():
        raise WeightsError(f"no checkpoint at {src}: no such file or directory")
    if src.is_dir():
        d, weights = src, _find_weights(src)
    elif src.name in ("config.json", "params.json"):
        d, weights = src.parent, _find_weights(src.parent)
    elif src.suffix in (*_PICKLED, ".safetensors") or src.name.endswith(".index.json"):
        d, weights = src.parent, src
    else:
        raise WeightsError(f"{src} is not a checkpoint: pass its directory, pytorch_model.bin, "
                           "pytorch_model.bin.index.json or consolidated.safetensors")
    kind, cfg, raw = _read_config(d, weights)
    if weights.name.startswith("model.safetensors") and kind in ("hf", "mamba_ssm hybrid"):
        what = "a mamba_ssm hybrid's safetensors checkpoint" if kind == "mamba_ssm hybrid" \
            else "an HF-format safetensors checkpoint"
        raise WeightsError(f"{d} is already {what}: use it as it is "
                           f"(export --model {d}, generate --weights {d})")
    pickled = weights.suffix in _PICKLED or weights.name.endswith(".bin.index.json")
    ckpt = open_torch_checkpoint(weights) if pickled else open_checkpoint(weights)
    tokenizer = [d / n for n in TOKENIZER_FILES if (d / n).is_file()]
    return Source(d, weights, kind, cfg, ckpt, tokenizer, raw)


def hf_name(name: str) -> str:
    """A checkpoint tensor name as HF's Mamba2ForCausalLM names it."""
    name = name.removeprefix("model.")  # mistral-inference wraps the mamba_ssm LM as `model`
    return "backbone.embeddings.weight" if name == "backbone.embedding.weight" else name


def _describe(cfg: Mamba2Config | HybridConfig) -> str:
    """`3 layers, d_model 64, vocab 208, tied head` (hybrids: their Mamba-2 / attention counts)."""
    if isinstance(cfg, HybridConfig):
        attn = cfg.layer_types.count("attention")
        layers = f"{len(cfg.layer_types)} layers ({len(cfg.layer_types) - attn} Mamba-2, {attn} attention)"
    else:
        layers = f"{cfg.num_hidden_layers} layers"
    groups = "" if isinstance(cfg, HybridConfig) else f", n_groups {cfg.n_groups}"
    return (f"{layers}, d_model {cfg.hidden_size}, vocab {cfg.vocab_size}{groups}, "
            f"{'tied' if cfg.tie_word_embeddings else 'untied'} head")


def _listed(problems: list[str]) -> str:
    more = f"; ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    return "; ".join(problems[:_MAX_LISTED]) + more


def plan(cfg: Mamba2Config | HybridConfig, ckpt: Checkpoint) -> tuple[list[tuple[str, str]], str | None]:
    """([(output name, checkpoint name)] in the weight spec's order, the stored tied lm_head or None).
    Output names are HF's for a Mamba-2 model, the checkpoint's own for a mamba_ssm hybrid.

    Every tensor the config's model has must be there with its shape and a float dtype, and
    nothing else (a tied model's stored lm_head is checked against the embedding when written)."""
    hybrid = isinstance(cfg, HybridConfig)
    if hybrid:
        from exporter.hybrid_params import param_shapes as hybrid_param_shapes

        expected, embedding, rename = hybrid_param_shapes(cfg), "backbone.embedding.weight", str
    else:
        expected, embedding, rename = param_shapes(cfg), "backbone.embeddings.weight", hf_name
    found: dict[str, str] = {}
    for name in ckpt.names():
        h = rename(name)
        if h in found:
            raise WeightsError(f"{ckpt.path}: tensors {found[h]} and {name} are the same tensor {h}")
        found[h] = name
    tied_head = found.pop("lm_head.weight", None) if cfg.tie_word_embeddings else None
    problems = []
    for h, s in expected.items():
        name = found.get(h)
        dt = None if name is None else ckpt.dtype(name)
        if name is None:
            problems.append(f"{h} is missing")
        elif ckpt.shape(name) != tuple(s.shape):
            problems.append(f"{name} has shape {list(ckpt.shape(name))}, the config's model needs {list(s.shape)}")
        elif dt is None or dtype_code(dt) is None:
            problems.append(f"{name} is {ckpt.dtype_name(name)}, not float32/float16/bfloat16/float64")
    problems += [f"unexpected tensor {found[h]}" for h in found if h not in expected]
    if tied_head is not None and ckpt.shape(tied_head) != tuple(expected[embedding].shape):
        problems.append(f"{tied_head} has shape {list(ckpt.shape(tied_head))}, unlike the embedding it is tied to")
    if problems:
        raise WeightsError(
            f"{ckpt.path} does not hold the model its config describes ({_describe(cfg)}): {len(problems)} problem"
            f"{'s' if len(problems) > 1 else ''}: {_listed(problems)}")
    return [(h, found[h]) for h in expected], tied_head


def _same_values(a: np.ndarray, b: np.ndarray, rows: int = 4096) -> bool:
    """a == b elementwise ([V, d] each), compared a block of rows at a time (no full-size temporaries)."""
    ia, ib = a.__array_interface__, b.__array_interface__
    if ia["data"] == ib["data"] and ia["strides"] == ib["strides"] and a.dtype == b.dtype:
        return True  # one stored tensor under two names (mamba_ssm ties by sharing it)
    return all(np.array_equal(a[i:i + rows], b[i:i + rows]) for i in range(0, a.shape[0], rows))


def _check_destination(out: Path, source: Source) -> None:
    out = out.resolve()
    for p in (source.directory.resolve(), source.weights.resolve()):
        if out == p or out in p.parents:
            raise ExportError(f"{out} would replace the checkpoint being converted ({p}): choose another OUT")


@dataclasses.dataclass
class Converted:
    kind: str
    config: Mamba2Config | HybridConfig
    summary: str  # the model, in words: layers, width, vocab, head
    tensors: int
    bytes: int
    dtypes: list[str]
    tokenizer_files: list[str]


def convert_checkpoint(src: Path, out: Path, force: bool = False) -> Converted:
    """Convert SRC into an HF-format directory OUT (replaced only with `force`; atomically); a
    mamba_ssm hybrid keeps its config.json and tensor names."""
    source = open_source(Path(src))
    with source.checkpoint as ckpt:
        pairs, tied_head = plan(source.config, ckpt)
        _check_destination(Path(out), source)
        with atomic_directory(out, force=force) as tmp:
            if tied_head is not None:
                emb = next(n for h, n in pairs if h in ("backbone.embeddings.weight", "backbone.embedding.weight"))
                if not _same_values(ckpt.read(tied_head), ckpt.read(emb)):
                    raise WeightsError(f"{source.weights}: the config ties the head to the embedding, but "
                                       f"{tied_head} differs from {emb}: if the head is separate, the config "
                                       "must say so (tie_embeddings: false)")
            entries = [(h, ckpt.dtype(n), ckpt.shape(n), functools.partial(ckpt.read, n)) for h, n in pairs]
            try:
                size = write_safetensors(tmp / "model.safetensors", entries)
                config = source.raw_config if isinstance(source.config, HybridConfig) else to_hf_config(source.config)
                (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
                for f in source.tokenizer_files:
                    shutil.copyfile(f, tmp / f.name)
            except OSError as e:
                raise ExportError(f"cannot write {out}: {e.strerror or e}") from None
            open_checkpoint(tmp / "model.safetensors").close()  # safetensors' own parser accepts it
    dtypes = sorted({np.dtype(e[1]).name for e in entries})
    return Converted(source.kind, source.config, _describe(source.config), len(pairs), size, dtypes, [f.name for f in source.tokenizer_files])
