"""Setup functions of the weights-* corpus cases (weights.yaml): score-model checkpoints benchkit must
refuse in one line naming the file, through `benchkit run` of a small digits suite whose DiffPure
defense points its score model's `path:` at the bad file. Each takes the case's folder and writes
`s.yaml` and `bad.<ext>` there; the pickle with code would overwrite `kept.txt` if it ever ran."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

# Tiny configurations of the three score-model architectures: the mismatch is found in a moment.
CONFIGS = {
    "ddpmpp": {"data": {"image_size": 8, "num_channels": 1, "centered": True},
               "model": {"nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4]}},
    "adm": {"image_size": 8, "num_channels": 32, "num_res_blocks": 1, "num_heads": 1, "num_head_channels": -1,
            "attention_resolutions": "4", "channel_mult": "1,2", "learn_sigma": True, "resblock_updown": True},
    "ddpm": {"data": {"image_size": 8, "channels": 3},
             "model": {"type": "simple", "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 2],
                       "num_res_blocks": 1, "attn_resolutions": [4]}},
}
EXT = {"ddpmpp": "pth", "adm": "pt", "ddpm": "ckpt"}


def suite(folder: Path, model: str, *, config: bool = False) -> Path:
    """s.yaml: the digits CNN behind DiffPure with score model `model` loaded from bad.<ext>."""
    score_params: dict = {"path": f"bad.{EXT[model]}"}
    if config:
        score_params["config"] = CONFIGS[model]
    doc = {"suite": "weights", "dataset": {"plugin": "digits", "params": {"n": 2}},
           "classifiers": [{"id": "cnn", "plugin": "digits-cnn"}],
           "defenses": [{"id": "dp", "plugin": "diffpure",
                         "params": {"score_model": model, "score_params": score_params, "dt": 0.05}}],
           "attacks": [{"id": "pgd", "plugin": "pgd-eot", "params": {"eps": 0.1, "steps": 1, "eot": 1}}],
           "grid": "all", "checks": {"enabled": []}}
    path = folder / "s.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def network(model: str) -> torch.nn.Module:
    from benchkit_diffpure.architectures.ddpm_unet import DDPMUNet
    from benchkit_diffpure.architectures.guided_unet import GuidedUNet
    from benchkit_diffpure.architectures.ncsnpp import NCSNpp

    build = {"ddpmpp": NCSNpp, "adm": GuidedUNet, "ddpm": DDPMUNet}[model].from_config
    torch.manual_seed(0)
    return build(CONFIGS[model])


def wrong_state(model: str) -> dict:
    """The tiny network's state dict with its first 3 keys gone, 2 keys of another model and the
    last weight of another shape."""
    state = dict(network(model).state_dict())
    keys = list(state)
    for k in keys[:3]:
        del state[k]
    state["other.weight"], state["other.bias"] = torch.zeros(2, 2), torch.zeros(2)
    last = [k for k in keys if k.endswith("weight")][-1]
    state[last] = torch.zeros(3, 3)
    return state


class Payload:
    """Pickles as a call of os.system: unpickling would run the shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def pickled_code(path: Path, victim: Path) -> None:
    """A torch checkpoint whose pickle calls os.system to overwrite `victim`."""
    victim.write_text("untouched\n")
    torch.save({"weight": torch.zeros(2), "hook": Payload(f"echo ran > {victim}")}, path)


def truncated(path: Path) -> None:
    torch.save({f"w{i}": torch.zeros(64) for i in range(4)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _case(model: str, kind: str, folder: Path) -> None:
    bad = folder / f"bad.{EXT[model]}"
    # adm declares its published size: a file of one's own comes with a `config` (another model), except
    # in the size case, where the file claims to be the published one.
    suite(folder, model, config=kind == "shape" or (model == "adm" and kind != "size"))
    if kind == "empty":
        bad.write_bytes(b"")
    elif kind == "truncated":
        truncated(bad)
    elif kind == "code":
        pickled_code(bad, folder / "kept.txt")
    elif kind == "shape":
        torch.save(wrong_state(model), bad)
    elif kind == "size":
        bad.write_bytes(b"\1" * 1234)


def _define(model: str, kind: str):
    def setup(folder: Path) -> None:
        _case(model, kind, folder)
    setup.__name__ = f"{model}_{kind}"
    return setup


# ddpmpp_empty, ..., ddpm_shape: module:function names for the manifest; adm_size for the declared size.
for _model in EXT:
    for _kind in ("empty", "truncated", "code", "shape"):
        globals()[f"{_model}_{_kind}"] = _define(_model, _kind)
adm_size = _define("adm", "size")
