"""`convert-checkpoint`: mamba_ssm (and mistral, and pickled HF) checkpoints into HF format.

The sources are built here as the official repositories ship them (tests/mamba_ssm_format.py)
from seeded HF models, so HF transformers is the independent reference: convert -> export ->
generate gives HF's greedy tokens, and transformers itself loads the converted directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mamba_ssm_format as ssm
from exporter.config import PRESETS, load_config
from exporter.conversion import plan
from exporter.params import weight_spec
from runtime.errors import WeightsError
from runtime.engine.weights import check_config
from test_errors_api import isolated_compile_cache  # noqa: F401  (autouse fixture)
from test_errors_cli import cli, error_line

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 64
PROMPT = [3, 17, 101, 5, 42, 9, 150, 77, 12, 60, 33, 8, 190, 1, 64, 21, 99, 45, 7]  # crosses a 16-chunk
VOCAB, MULTIPLE = 197, 16  # stored unpadded, as mamba_ssm configs do; the embedding has 208 rows

# name -> (seed, HF overrides, shards): tied single file; n_groups 2 + untied head + biases, sharded.
VARIANTS = {
    "tied": (0, dict(vocab_size=208), 1),
    "groups2-untied": (1, dict(vocab_size=208, n_groups=2, num_hidden_layers=3, tie_word_embeddings=False,
                               use_bias=True), 2),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """{variant: (HF model, mamba_ssm checkpoint dir)}."""
    import hf_reference

    out = {}
    for name, (seed, overrides, shards) in VARIANTS.items():
        model = hf_reference.make_hf_model(seed=seed, **overrides)
        d = ssm.write_checkpoint(model, tmp_path_factory.mktemp(f"ssm-{name}") / "mamba2-tiny", VOCAB, MULTIPLE, shards)
        out[name] = (model, d)
    return out


def _convert(capfd, src, out, *extra) -> str:
    code, stdout, err = cli(capfd, "convert-checkpoint", src, out, *extra)
    assert code == 0, err
    return stdout


def _main(*args) -> None:
    """`mamba2-aot ARGS` in-process, which must succeed (output left to pytest's capture)."""
    from runtime.tools.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert e.value.code == 0, args


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory) -> dict:
    """{variant: (HF model, mamba_ssm dir, converted dir, artifact)}: the artifact is exported from
    the mamba_ssm config itself; the converted dir holds its weights."""
    out = {}
    for name, (model, src) in sources.items():
        root = tmp_path_factory.mktemp(f"converted-{name}")
        _main("convert-checkpoint", src, root / "hf")
        _main("export", "--model", src, "--out", root / "art", "--max-batch", "1", "--max-prompt-tokens", "32",
              "--max-new-tokens", str(NEW_TOKENS))
        out[name] = (model, src, root / "hf", root / "art")
    return out


# ---------------------------------------------------------------- end to end against HF


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_convert_export_generate_gives_hf_tokens(variant, converted, capfd):
    import hf_reference
    import torch
    from transformers import Mamba2ForCausalLM

    model, src, out, art = converted[variant]
    # transformers itself loads the result as the model it came from
    reloaded = Mamba2ForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(ids).logits.numpy(), model(ids).logits.numpy())
    code, stdout, err = cli(capfd, "generate", art, "--weights", out, "--prompt-ids", ",".join(map(str, PROMPT)),
                            "--max-new-tokens", str(NEW_TOKENS), "--json")
    assert code == 0, err
    expected, _ = hf_reference.hf_greedy(model, PROMPT, NEW_TOKENS)
    assert json.loads(stdout)["tokens"] == [expected]


def test_convert_reports_what_it_wrote(sources, capfd, tmp_path):
    stdout = _convert(capfd, sources["groups2-untied"][1], tmp_path / "out")
    assert "converted mamba_ssm checkpoint" in stdout and "36 tensors" in stdout and "vocab 208" in stdout
    assert "3 layers" in stdout and "untied head" in stdout and "--tokenizer" in stdout


def test_loading_the_pickled_checkpoint_points_to_convert(converted, capfd):
    _, src, _, art = converted["tied"]
    code, out, err = cli(capfd, "generate", art, "--weights", src, "--prompt-ids", "1,2")
    error_line(code, err, "never loaded", f"mamba2-aot convert-checkpoint {src} OUT")
    code, out, err = cli(capfd, "generate", art, "--weights", src / "pytorch_model.bin", "--prompt-ids", "1,2")
    error_line(code, err, f"mamba2-aot convert-checkpoint {src / 'pytorch_model.bin'} OUT")


def _word_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "hello", "world", "the", "mamba", "snake", "state", "space"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def test_generate_takes_a_tokenizer_for_checkpoints_without_one(converted, capfd, tmp_path):
    _, _, out, art = converted["tied"]
    tok = _word_tokenizer(tmp_path / "neox" / "tokenizer.json")
    common = ["--weights", out, "--max-new-tokens", "8", "--json"]
    code, stdout, err = cli(capfd, "generate", art, "--prompt", "hello mamba state space", *common)
    error_line(code, err, "--prompt needs the checkpoint's tokenizer.json", "--tokenizer PATH")
    code, by_ids, err = cli(capfd, "generate", art, "--prompt-ids", "1,4,6,7", *common)
    assert code == 0, err
    for where in (tok, tok.parent):  # the file, or a directory holding it
        code, by_text, err = cli(capfd, "generate", art, "--prompt", "hello mamba state space", "--tokenizer", where,
                                 *common)
        assert code == 0, err
        assert json.loads(by_text) == json.loads(by_ids)
    code, stdout, err = cli(capfd, "generate", art, "--prompt-ids", "1,4", "--tokenizer", tok, *common[:-1])
    assert code == 0 and stdout.startswith("[0] ") and all(w.isalpha() or w == "[UNK]" for w in stdout[4:].split())
    for bad, needle in ((tmp_path / "nope.json", "no such file"), (tmp_path, "no tokenizer.json in that directory")):
        code, _, err = cli(capfd, "generate", art, "--prompt", "hello", "--tokenizer", bad, *common)
        error_line(code, err, f"--tokenizer {bad}", needle)


def test_converted_directory_is_hf_format(sources, capfd, tmp_path):
    from safetensors import safe_open

    for variant, (model, src) in sources.items():
        out = tmp_path / variant
        _convert(capfd, src, out)
        hf = json.loads((out / "config.json").read_text())
        assert hf["model_type"] == "mamba2" and hf["vocab_size"] == 208
        assert hf["n_groups"] == model.config.n_groups and hf["tie_word_embeddings"] == model.config.tie_word_embeddings
        assert hf["eos_token_id"] is None  # not GPT-NeoX's vocabulary: no guessed stop token
        assert load_config(str(out)) == dataclasses.replace(load_config(str(src)), name=variant)  # one model
        with safe_open(str(out / "model.safetensors"), "np") as f:
            names = set(f.keys())
        want = {k for k in model.state_dict() if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
        assert names == want


def test_mamba_ssm_shapes_are_mamba_ssms(sources):
    """The shape formulas used for the presets below, checked against real state dicts."""
    for model, src in sources.values():
        config = json.loads((src / "config.json").read_text())
        got = {k: tuple(v.shape) for k, v in ssm.state_dict(model).items()}
        assert got == ssm.mamba_ssm_shapes(config)


class _ShapesOnly:
    """A checkpoint of shapes alone (float32): what `plan` sees of a real one."""

    def __init__(self, shapes: dict):
        self.path, self._shapes = Path("shapes-only"), shapes

    def names(self):
        return list(self._shapes)

    def shape(self, name):
        return self._shapes[name]

    def dtype(self, name):
        return np.dtype(np.float32)


@pytest.mark.parametrize("size", list(ssm.OFFICIAL_SIZES))
def test_preset_is_the_converted_official_checkpoint(size, tmp_path):
    """`--model SIZE` exports exactly the model the converted state-spaces/mamba2-SIZE loads into."""
    from exporter.config_files import from_mamba_ssm_config, to_hf_config

    official = ssm.official_config(size)
    cfg = from_mamba_ssm_config(official, name=size)
    assert cfg == PRESETS[size] and cfg.vocab_size == 50288 and cfg.tie_word_embeddings
    spec = weight_spec(PRESETS[size])
    assert weight_spec(cfg) == spec
    # every tensor of the official checkpoint lands on the preset's spec, shape for shape
    pairs, tied_head = plan(cfg, _ShapesOnly(ssm.mamba_ssm_shapes(official)))
    assert tied_head == "lm_head.weight"
    shapes = ssm.mamba_ssm_shapes(official)
    assert [(h, list(shapes[n])) for h, n in pairs] == [(t["name"], t["shape"]) for t in spec["tensors"]]
    # the converted config.json matches the preset's artifact
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    check_config(json.loads((tmp_path / "config.json").read_text()), spec)
    assert load_config(str(tmp_path)) == dataclasses.replace(PRESETS[size], name=tmp_path.name)


# ---------------------------------------------------------------- other sources


def test_hf_pickled_checkpoint_converts(tmp_path, capfd):
    """transformers' older pytorch_model.bin (HF names, HF config) converts too."""
    import hf_reference
    import torch
    from safetensors.torch import load_file

    model = hf_reference.make_hf_model(seed=3, tie_word_embeddings=False)
    src = tmp_path / "hf-bin"
    src.mkdir()
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    model.config.to_json_file(str(src / "config.json"))
    stdout = _convert(capfd, src / "pytorch_model.bin", tmp_path / "out")
    assert "converted hf checkpoint" in stdout
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert got.keys() == model.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())


def test_mistral_layout_converts(tmp_path, capfd):
    """Codestral-Mamba's mistral layout: params.json + consolidated.safetensors, bfloat16, names
    under mistral-inference's `model.` wrapper; token ids are mistral's (<s> 1, </s> 2)."""
    import hf_reference
    import torch
    from safetensors.torch import load_file, save_file

    # params.json has no head or state sizes: mamba_ssm's defaults (headdim 64, d_state 128) apply
    model = hf_reference.make_hf_model(seed=4, n_groups=2, head_dim=64, state_size=128, tie_word_embeddings=False,
                                       vocab_size=256)
    src = tmp_path / "Mamba-Codestral-tiny"
    src.mkdir()
    weights = {"model." + k: v.to(torch.bfloat16).contiguous() for k, v in ssm.state_dict(model).items()}
    save_file(weights, str(src / "consolidated.safetensors"))
    c = model.config
    (src / "params.json").write_text(json.dumps({
        "dim": c.hidden_size, "n_layers": c.num_hidden_layers, "vocab_size": 256, "n_groups": 2, "rms_norm": True,
        "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 1, "tie_embeddings": False,
        "model_type": "mamba"}))
    (src / "tokenizer.model.v3").write_bytes(b"sentencepiece model bytes")
    stdout = _convert(capfd, src, tmp_path / "out")
    assert "converted mistral checkpoint" in stdout and "bfloat16" in stdout
    out = tmp_path / "out"
    got = load_file(str(out / "model.safetensors"))
    want = {("backbone.embeddings.weight" if k == "model.backbone.embedding.weight" else k[6:]): v
            for k, v in weights.items()}
    assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())
    hf = json.loads((out / "config.json").read_text())
    assert (hf["bos_token_id"], hf["eos_token_id"], hf["n_groups"], hf["tie_word_embeddings"]) == (1, 2, 2, False)
    assert (out / "tokenizer.model.v3").read_bytes() == b"sentencepiece model bytes"


def test_codestral_params_json_is_codestrals_hf_config(tmp_path):
    """The real Codestral-Mamba-7B params.json maps to the model its HF config.json describes."""
    from test_model import CODESTRAL_JSON

    (tmp_path / "params.json").write_text(json.dumps({
        "dim": 4096, "n_layers": 64, "vocab_size": 32768, "n_groups": 8, "rms_norm": True, "residual_in_fp32": True,
        "fused_add_norm": True, "pad_vocab_size_multiple": 1, "tie_embeddings": False, "model_type": "mamba"}))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(CODESTRAL_JSON)
    assert weight_spec(load_config(str(tmp_path))) == weight_spec(load_config(str(tmp_path / "hf")))


def test_hf_safetensors_checkpoint_needs_no_conversion(tmp_path, capfd, tiny_hf):
    code, _, err = cli(capfd, "convert-checkpoint", tiny_hf.path, tmp_path / "out")
    error_line(code, err, "already an HF-format safetensors checkpoint", "use it as it is")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- refusals and OUT handling


def test_tied_head_that_differs_is_refused(sources, tmp_path, capfd):
    import torch

    model, src = sources["tied"]
    sd = ssm.state_dict(model)
    sd["lm_head.weight"] = sd["lm_head.weight"].clone()
    sd["lm_head.weight"][0, 0] += 1
    d = tmp_path / "src"
    d.mkdir()
    torch.save(sd, d / "pytorch_model.bin")
    (d / "config.json").write_text((src / "config.json").read_text())
    code, _, err = cli(capfd, "convert-checkpoint", d, tmp_path / "out")
    error_line(code, err, "lm_head.weight differs from backbone.embedding.weight", "tie_embeddings: false")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, needles", [
    (lambda c: c.update(n_layer=3), ["backbone.layers.2.mixer.A_log is missing", "3 layers"]),
    (lambda c: c["ssm_cfg"].update(d_state=8), ["in_proj.weight has shape", "needs"]),
    (lambda c: c["ssm_cfg"].update(ngroups=2), ["conv1d.weight has shape", "n_groups 2"]),
    (lambda c: c.update(pad_vocab_size_multiple=8), ["backbone.embedding.weight has shape [208, 64]", "[200, 64]"]),
], ids=["layers", "d_state", "ngroups", "vocab-padding"])
def test_config_that_disagrees_with_the_weights_is_refused(edit, needles, sources, tmp_path, capfd):
    _, src = sources["tied"]
    d = tmp_path / "src"
    d.mkdir()
    os.symlink(src / "pytorch_model.bin", d / "pytorch_model.bin")
    config = json.loads((src / "config.json").read_text())
    edit(config)
    (d / "config.json").write_text(json.dumps(config))
    code, _, err = cli(capfd, "convert-checkpoint", d, tmp_path / "out")
    error_line(code, err, "does not hold the model its config describes", *needles)
    assert not (tmp_path / "out").exists()


def test_existing_out_is_kept_unless_forced(sources, tmp_path, capfd):
    model, src = sources["tied"]
    out = tmp_path / "out"
    _convert(capfd, src, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = cli(capfd, "convert-checkpoint", src, out)
    error_line(code, err, "already exists", "--force")
    # a failing forced conversion (a config the weights disagree with) leaves OUT as it was
    bad = tmp_path / "bad"
    bad.mkdir()
    os.symlink(src / "pytorch_model.bin", bad / "pytorch_model.bin")
    (bad / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), "n_layer": 1}))
    code, _, err = cli(capfd, "convert-checkpoint", bad, out, "--force")
    error_line(code, err, "unexpected tensor backbone.layers.1")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    _convert(capfd, src, out, "--force")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]  # no leftovers


@pytest.mark.parametrize("where", ["src", "parent"])
def test_out_never_replaces_the_source(where, sources, tmp_path, capfd):
    model, src = sources["tied"]
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in src.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    target = d if where == "src" else tmp_path
    code, _, err = cli(capfd, "convert-checkpoint", d, target, "--force")
    error_line(code, err, "would replace the checkpoint being converted")
    assert (d / "pytorch_model.bin").is_file()


@pytest.mark.parametrize("case, needles", [
    ("missing", ["no checkpoint at"]),
    ("no-weights", ["has no pytorch_model.bin"]),
    ("no-config", ["has no config.json", "needs the model's config"]),
    ("other-file", ["is not a checkpoint"]),
])
def test_bad_sources_are_refused(case, needles, tmp_path, capfd):
    d = tmp_path / "src"
    d.mkdir()
    if case == "no-weights":
        (d / "config.json").write_text(json.dumps(ssm.official_config("130m")))
    elif case == "no-config":
        (d / "pytorch_model.bin").write_bytes(b"PK")
    elif case == "other-file":
        (d / "notes.txt").write_text("hello")
    src = {"missing": tmp_path / "nope", "other-file": d / "notes.txt"}.get(case, d)
    code, _, err = cli(capfd, "convert-checkpoint", src, tmp_path / "out")
    error_line(code, err, *needles)


def test_tokenizer_files_are_copied(sources, tmp_path, capfd):
    model, src = sources["tied"]
    d = tmp_path / "src"
    d.mkdir()
    for f in src.iterdir():
        os.symlink(f, d / f.name)
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    (d / "tokenizer_config.json").write_text("{}")
    stdout = _convert(capfd, d, tmp_path / "out")
    assert "tokenizer: tokenizer.json, tokenizer_config.json" in stdout
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"version": "1.0"}'


def test_conversion_needs_no_torch(sources, tmp_path):
    """The reader is self-contained: a process that cannot import torch converts the .bin."""
    _, src = sources["groups2-untied"]
    out = tmp_path / "out"
    code = ("import sys; sys.modules['torch'] = None\n"
            "from exporter.conversion import convert_checkpoint\n"
            f"done = convert_checkpoint({str(src)!r}, {str(out)!r})\n"
            "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
            "print(done.tensors)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(len(ssm.mamba_ssm_shapes(json.loads((src / "config.json").read_text()))))
    assert (out / "model.safetensors").is_file()


def test_plan_refuses_two_names_for_one_tensor():
    shapes = ssm.mamba_ssm_shapes(ssm.official_config("130m"))
    shapes["backbone.embeddings.weight"] = shapes["backbone.embedding.weight"]
    with pytest.raises(WeightsError, match="are the same tensor backbone.embeddings.weight"):
        plan(PRESETS["130m"], _ShapesOnly(shapes))
