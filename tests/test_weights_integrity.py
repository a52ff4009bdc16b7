"""Weights that are what they claim: checkpoint loading fails in one line naming the file (empty,
truncated, pickled code, tensors that do not fit), declared sizes and digests are checked, every
declared file's sha256 and every plugin's version key the cells (a changed file is recomputed,
saying so), provenance lists the files, and `benchkit zoo verify` checks every model."""
from __future__ import annotations

import hashlib
import json
import pickle
import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from benchkit import assets, plugins, registry, resolve
from benchkit.assets import Asset, DoesNotFit, load_into, load_state_dict, state_mismatch
from benchkit.cli import main
from benchkit.errors import BadInput, MissingAsset
from benchkit.hookspecs import hookimpl
from benchkit.provenance import config_changes
from conftest import ROOT, write
from malformed.setup_weights import CONFIGS, Payload, network, truncated, wrong_state

EXT = {"ddpmpp": "pth", "adm": "pt", "ddpm": "ckpt"}


# ---------------------------------------------------------------- loading a file


def test_empty_truncated_and_foreign_files_are_one_line(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(MissingAsset) as exc:
        load_state_dict(empty)
    assert exc.value.problems == [f"{empty}: empty (0 bytes); is the download complete?"]

    cut = tmp_path / "cut.pth"
    truncated(cut)
    with pytest.raises(MissingAsset) as exc:
        load_state_dict(cut)
    assert exc.value.problems == [f"{cut}: truncated or not a torch checkpoint (RuntimeError: PytorchStreamReader "
                                  "failed reading zip archive: failed finding central directory)"]

    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(300)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_state_dict(legacy)["w"], torch.zeros(300))
    legacy.write_bytes(legacy.read_bytes()[:600])
    with pytest.raises(MissingAsset, match=r"legacy\.pth: truncated or not a torch checkpoint \(RuntimeError: "
                                           r"unexpected EOF, expected \d+ more bytes\)$"):
        load_state_dict(legacy)

    st = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(300)}, st)
    st.write_bytes(st.read_bytes()[:100])
    with pytest.raises(MissingAsset) as exc:
        load_state_dict(st)
    assert exc.value.problems == [f"{st}: truncated or not a safetensors file (SafetensorError: Error while "
                                  "deserializing header: incomplete metadata, file not fully covered)"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("layout", ["zip", "legacy", "pickle protocol 2", "pickle protocol 4"])
def test_pickled_code_is_never_run(tmp_path, layout):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    state = {"w": torch.zeros(2), "hook": Payload(f"touch {marker}")}
    if layout.startswith("pickle"):   # protocol 4 names globals with STACK_GLOBAL, 2 with GLOBAL
        path.write_bytes(pickle.dumps(state, protocol=int(layout[-1])))
    else:
        torch.save(state, path, _use_new_zipfile_serialization=layout == "zip")
    with pytest.raises(MissingAsset) as exc:
        load_state_dict(path)
    assert exc.value.problems == [f"{path}: holds pickled code, which benchkit never runs; it would call "
                                  "posix.system: use the published file, or a .safetensors copy of its tensors"]
    assert assets.pickled_callables(path) == ["posix.system"]
    assert not marker.exists()


def test_a_plain_checkpoint_calls_nothing(tmp_path):
    torch.save({"model": {"w": torch.zeros(2)}, "step": 3, "ema": {"shadow_params": [torch.ones(2)]}}, tmp_path / "c.pth")
    assert assets.pickled_callables(tmp_path / "c.pth") == []


def test_mismatch_diagnosis_in_one_line(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.Linear(64, 3))
    state = dict(net.state_dict())
    del state["0.bias"]
    state["x.a"], state["x.b"] = torch.zeros(1), torch.zeros(1)
    state["1.weight"] = torch.zeros(3, 3)
    problem = "1 missing key (e.g. '0.bias'), 2 unexpected (e.g. 'x.a'), shape of '1.weight' is [3, 3] but the model has [3, 64]"
    assert state_mismatch(net, state) == problem
    with pytest.raises(DoesNotFit) as exc:
        load_into(net, state, tmp_path / "f.pt", "the toy architecture")
    assert exc.value.problems == [f"{tmp_path / 'f.pt'}: does not fit the toy architecture: {problem}; "
                                  "is it the published file?"]
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, MissingAsset)
    assert state_mismatch(net, [state]) == "it holds a list, not a state dict"
    assert state_mismatch(net, {**net.state_dict(), "0.bias": 3}) == "'0.bias' is a int, not a tensor"
    assert load_into(net, net.state_dict(), "f", "x") is net


# ---------------------------------------------------------------- the score-model loaders


def _build(model: str, path: Path, config: bool = True):
    params = {"path": str(path), **({"config": CONFIGS[model]} if config else {})}
    return registry.get("score-models").get(model).build(params)


@pytest.mark.parametrize("model", list(EXT))
def test_score_model_loaders_refuse_bad_files_in_one_line(tmp_path, plugin_manager, model):
    bad = tmp_path / f"bad.{EXT[model]}"
    bad.write_bytes(b"")
    with pytest.raises(MissingAsset) as exc:
        _build(model, bad)
    assert exc.value.problems == [f"{bad}: empty (0 bytes); is the download complete?"]

    truncated(bad)
    with pytest.raises(MissingAsset, match=r"truncated or not a torch checkpoint \(RuntimeError: PytorchStreamReader"):
        _build(model, bad)

    marker = tmp_path / "marker"
    torch.save({"w": torch.zeros(2), "hook": Payload(f"touch {marker}")}, bad)
    with pytest.raises(MissingAsset, match=r"holds pickled code, which benchkit never runs; it would call posix\.system"):
        _build(model, bad)
    assert not marker.exists()

    state = wrong_state(model)
    torch.save(state, bad)
    with pytest.raises(MissingAsset) as exc:
        _build(model, bad)
    (line,) = exc.value.problems
    assert line.startswith(f"{bad}: does not fit the {model} architecture: 3 missing keys (e.g. ")
    assert ", 2 unexpected (e.g. 'other.bias'), shape of " in line and line.endswith("; is it the published file?")

    # The same network's own tensors load (ddpmpp: in score_sde's checkpoint layout, EMA weights).
    net = network(model)
    own = net.state_dict()
    if model == "ddpmpp":
        params = [n for n, _ in net.named_parameters()]
        own = {"model": {f"module.{k}": v for k, v in own.items()}, "step": 1,
               "ema": {"shadow_params": [own[n] for n in params]}}
    torch.save(own, bad)
    score = _build(model, bad)
    assert all(torch.equal(a, b) for a, b in zip(score.net.state_dict().values(), net.state_dict().values()))


def test_score_sde_ema_mismatch_names_the_file(tmp_path, plugin_manager):
    net = network("ddpmpp")
    names = [n for n, _ in net.named_parameters()]
    state = net.state_dict()
    ckpt = {"model": {f"module.{k}": v for k, v in state.items()}, "ema": {"shadow_params": [state[n] for n in names][:-1]}}
    path = tmp_path / "checkpoint_8.pth"
    torch.save(ckpt, path)
    with pytest.raises(DoesNotFit) as exc:
        _build("ddpmpp", path)
    assert exc.value.problems == [f"{path}: does not fit the ddpmpp architecture: EMA has {len(names) - 1} shadow "
                                  f"params but the model has {len(names)} parameters; is it the published file?"]


def test_published_size_is_checked_and_own_models_are_not_held_to_it(tmp_path, plugin_manager):
    bad = tmp_path / "256x256_diffusion_uncond.pt"
    bad.write_bytes(b"\1" * 1234)
    with pytest.raises(MissingAsset) as exc:
        _build("adm", bad, config=False)
    assert exc.value.problems == [f"{bad}: 1,234 bytes but the published file is 2,211,383,297; the download is "
                                  "incomplete or it is another file"]
    # With a `config` of its own the file is another model: no published size to match.
    with pytest.raises(MissingAsset, match="truncated or not a torch checkpoint"):
        _build("adm", bad)


def test_config_the_architecture_refuses_is_one_line(tmp_path, plugin_manager):
    path = tmp_path / "x.pt"
    torch.save({}, path)
    with pytest.raises(BadInput) as exc:
        registry.get("score-models").get("adm").build({"path": str(path), "config": {**CONFIGS["adm"], "class_cond": True}})
    assert exc.value.problems == ["score model 'adm': config: ValueError: class_cond=True is not supported "
                                  "(unconditional model only)"]


# ---------------------------------------------------------------- declared size and sha256


def test_require_checks_size_and_sha256_hashing_once(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCHKIT_HOME", str(tmp_path / "home"))
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc" * 1000)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(MissingAsset) as exc:
        Asset("w.bin", "the test", size=31_035_526).require(path)
    assert exc.value.problems == [f"{path}: 3,000 bytes but the published file is 31,035,526; the download is "
                                  "incomplete or it is another file"]
    assert Asset("w.bin", "the test", size=31_035_526).require(path, published=False) == path

    calls = []
    real = assets.sha256_file
    monkeypatch.setattr(assets, "sha256_file", lambda p: calls.append(p) or real(p))
    good = Asset("w.bin", "the test", sha256=digest, size=3000)
    assert good.require(path) == path and good.require(path) == path
    assert len(calls) == 1   # the digest is cached by (path, size, mtime)
    with pytest.raises(MissingAsset, match=f"sha256 mismatch \\(expected {'0' * 64}, got {digest}\\)"):
        Asset("w.bin", "the test", sha256="0" * 64).require(path)
    assert len(calls) == 1


def test_require_checks_the_name_prefix_and_the_digest_recorded_at_download(tmp_path, monkeypatch):
    """Without a published sha256, a file swapped for another of the right shapes is still caught:
    by the sha256 prefix its published name carries, or by the digest recorded when it was downloaded."""
    monkeypatch.setenv("BENCHKIT_HOME", str(tmp_path / "home"))
    path = tmp_path / "w.bin"
    path.write_bytes(b"published")
    digest = hashlib.sha256(b"published").hexdigest()
    assert Asset("w.bin", "the test", sha256_prefix=digest[:8]).require(path) == path
    with pytest.raises(MissingAsset) as exc:
        Asset("w.bin", "the test", sha256_prefix="0676ba61").require(path)
    assert exc.value.problems == [f"{path}: sha256 {digest[:16]}…, but the published file's starts with 0676ba61 "
                                  "(its name says so); the file is corrupt or not the published one"]

    plain = Asset("w.bin", "the test")
    assets.record_digest(path, digest)           # what `benchkit assets --download` does
    assert plain.require(path) == path
    path.write_bytes(b"random init, same shapes")
    other = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(MissingAsset) as exc:
        plain.require(path)
    assert exc.value.problems == [
        f"{path}: changed since it was downloaded (sha256 {digest[:16]}… recorded in {tmp_path / 'home' / 'sha256sums'}, "
        f"now {other[:16]}…): delete it and run `benchkit assets SUITE --download`, or, if you replaced it on "
        "purpose, remove its line there"]
    assert plain.require(path, published=False) == path   # one's own model is not held to the record


# ---------------------------------------------------------------- what keys a cell


def test_cell_config_keys_the_zoo_files_and_plugin_versions(plugin_manager):
    from benchkit_zoo.catalog import CATALOG

    r = resolve.load(ROOT / "suites" / "digits_quick.yaml")
    config = r.cell("cnn/diffpure/pgd-eot").config(r.suite)
    assert resolve.PROTOCOL == 4
    assert config["files"] == {  # digits-unet through the diffpure defense that names it
        "classifier": {"benchkit_zoo/digits_cnn.safetensors": CATALOG["digits-cnn"].sha256},
        "defense": {"benchkit_zoo/digits_unet.safetensors": CATALOG["digits-unet"].sha256}}
    version = {p["name"]: p["version"] for p in plugins.plugin_info()}
    assert config["plugins"] == {n: version[n] for n in ("attacks", "data", "diffpure", "zoo")}
    undefended = r.cell("cnn/none/aa-linf").config(r.suite)   # identity and autoattack declare no files
    assert undefended["files"] == {"classifier": config["files"]["classifier"]}
    assert undefended["plugins"] == {n: version[n] for n in ("autoattack", "baselines", "data", "zoo")}


def test_config_changes_in_words():
    old = {"protocol": 4, "defense": {"id": "diffpure"}, "dataset": {"plugin": "digits"},
           "files": {"defense": {"benchkit_zoo/digits-unet.safetensors": "1a2b3c4d" + "0" * 56}},
           "plugins": {"attacks": "0.1.0", "diffpure": "0.1.0"}}
    new = {**old, "files": {"defense": {"benchkit_zoo/digits-unet.safetensors": "5e6f7a8b" + "0" * 56}}}
    assert config_changes(old, new) == ("weights changed since these results (defense 'diffpure': "
                                        "digits-unet.safetensors 1a2b3c4d… -> 5e6f7a8b…)")
    assert config_changes(old, {**old, "plugins": {"attacks": "0.2.0", "diffpure": "0.1.0"}}) == \
        "plugin code changed since these results (attacks 0.1.0 -> 0.2.0)"
    assert config_changes(old, {**new, "plugins": {"attacks": "0.2.0", "diffpure": "0.1.0"}}) == (
        "weights and plugin code changed since these results (defense 'diffpure': digits-unet.safetensors "
        "1a2b3c4d… -> 5e6f7a8b…; attacks 0.1.0 -> 0.2.0)")
    assert config_changes(old, {**new, "protocol": 5}) is None   # another configuration altogether
    assert config_changes(old, old) is None


# ---------------------------------------------------------------- reuse, end to end

LINEAR = Asset("bkw/linear.safetensors", "written by the test")


def _linear(params) -> torch.nn.Module:
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    path = LINEAR.require()
    return load_into(net, load_state_dict(path), path, "the linear digits classifier")


class LinearPlugin:
    """A classifier whose weights file the test controls, declared as its asset."""

    @hookimpl
    def register_classifiers(self, register):
        register("linear-digits", _linear, assets=lambda params: [(LINEAR, None)],
                 description="a linear digits classifier from BENCHKIT_HOME/bkw/linear.safetensors")


def _weights(label: int) -> dict[str, torch.Tensor]:
    """Same shapes, other values: every image is classified as `label`."""
    bias = torch.zeros(10)
    bias[label] = 1.0
    return {"1.weight": torch.zeros(10, 64), "1.bias": bias}


SUITE = """
suite: weights
dataset: {plugin: digits, params: {n: 8}}
classifiers: [{id: lin, plugin: linear-digits}]
defenses: [{id: none, plugin: identity}]
attacks: [{id: pgd, plugin: pgd-eot, params: {eps: 0.1, steps: 1, eot: 1}}]
grid: all
eval: {repeats: 1}
checks: {enabled: []}
"""


def _run(suite, out, capsys) -> list[str]:
    assert main(["run", str(suite), "--out", str(out)]) == 0
    return [line for line in capsys.readouterr().err.splitlines() if "since these results" in line or "shard(s)" in line]


def test_changed_weights_are_recomputed_saying_so(tmp_path, plugin_manager, monkeypatch, capsys):
    monkeypatch.setenv("BENCHKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(plugins._DISTS, "bkw", ("bk-weights", "0.1"))
    plugin_manager.register(LinearPlugin(), name="bkw")
    registry.reset()
    weights = LINEAR.path
    weights.parent.mkdir(parents=True)
    save_file(_weights(0), str(weights))
    first = assets.sha256_file(weights)
    suite, out = write(tmp_path / "s.yaml", SUITE), tmp_path / "out"

    assert _run(suite, out, capsys) == ["benchkit: weights: 1 cells, 1 shard(s) to compute -> " + str(out) + " (device: cpu)"]
    assert _run(suite, out, capsys)[-1].startswith("benchkit: weights: 1 cells, 0 shard(s) to compute")   # reused

    save_file(_weights(3), str(weights))
    second = assets.sha256_file(weights)
    lines = _run(suite, out, capsys)
    assert lines[0] == (f"benchkit: lin/none/pgd: weights changed since these results (classifier 'lin': "
                        f"linear.safetensors {first[:8]}… -> {second[:8]}…); recomputing")
    assert lines[1].startswith("benchkit: weights: 1 cells, 1 shard(s) to compute")

    db = sqlite3.connect(out / "results.sqlite")
    cells = db.execute("SELECT id, config_json FROM cells WHERE key='lin/none/pgd' ORDER BY id").fetchall()
    assert [json.loads(c)["files"]["classifier"]["bkw/linear.safetensors"] for _, c in cells] == [first, second]
    for (cell_id, _), label in zip(cells, (0, 3)):   # the old results stay; the new ones come from the new file
        rows = db.execute("SELECT label, clean_flags FROM examples WHERE cell_id=? ORDER BY image_index", (cell_id,))
        assert [flags for _, flags in rows] == ["1" if y == label else "0" for y in _labels(8)]
    prov = json.loads(db.execute("SELECT provenance_json FROM runs ORDER BY id DESC LIMIT 1").fetchone()[0])
    assert prov["files"] == {str(weights.resolve()): second}

    monkeypatch.setitem(plugins._DISTS, "bkw", ("bk-weights", "0.2"))
    assert _run(suite, out, capsys)[0] == ("benchkit: lin/none/pgd: plugin code changed since these results "
                                           "(bkw 0.1 -> 0.2); recomputing")


def _labels(n: int) -> list[int]:
    from benchkit_data.digits import load_digits_split

    return load_digits_split("test")[1][:n].tolist()


# ---------------------------------------------------------------- zoo verify


def test_zoo_verify_checks_every_model(tmp_path, plugin_manager, monkeypatch, capsys):
    from benchkit_zoo import catalog
    from benchkit_zoo.nets import DigitsUNet

    for name in catalog.CATALOG:
        (tmp_path / catalog.CATALOG[name].filename).write_bytes(catalog.weights_path(name).read_bytes())
    monkeypatch.setattr(catalog, "WEIGHTS_DIR", tmp_path)
    (tmp_path / "digits_vae.safetensors").unlink()                       # missing
    blob = bytearray((tmp_path / "digits_gan.safetensors").read_bytes())
    blob[-1] ^= 1
    (tmp_path / "digits_gan.safetensors").write_bytes(bytes(blob))        # tampered
    cnn_at = catalog.CATALOG["digits-cnn-at"]                             # the file of another architecture
    monkeypatch.setitem(catalog.CATALOG, "digits-cnn-at", catalog.ZooEntry(
        cnn_at.name, DigitsUNet, cnn_at.filename, cnn_at.sha256, cnn_at.recipe, cnn_at.description))

    assert main(["zoo", "verify"]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 6 and lines[0] == "digits-cnn: ok (11c09d4c4d9ae2ba)" and lines[1].startswith("digits-unet: ok (")
    assert lines[2].startswith(f"digits-cnn-at: BAD: {tmp_path / cnn_at.filename}: does not fit the DigitsUNet "
                               "architecture of zoo model 'digits-cnn-at': ")
    assert lines[3] == (f"digits-vae: BAD: weights of zoo model 'digits-vae' not found at "
                        f"{tmp_path / 'digits_vae.safetensors'}; make them with `benchkit zoo train digits-vae`")
    assert lines[4].startswith("digits-gan: BAD: sha256 mismatch for zoo model 'digits-gan' weights ")
    assert lines[5].startswith("digits-gan-encoder: ok (")
    assert err == ("benchkit: zoo verify: 3 of 6 model(s) bad; restore the shipped files or retrain them with "
                   "`benchkit zoo train NAME`\n")
    assert main(["zoo", "verify", "digits-cnn"]) == 0
