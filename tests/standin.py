"""Stand-in assets for running a paper suite end to end on CPU: the suite's merged dict patched
generically (small data under a temporary root, a small score model of the same family with random
weights, attacks shrunk to a few steps), and random-weight classifiers saved in their published file
formats where the plugins look (a temporary BENCHKIT_HOME), or, where the real architecture is too
costly for AutoAttack on CPU, a tiny network of the same family (the `standin-classifier` plugin the
test registers). Used by test_paper_suites_standin.py."""
from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml

from benchkit.hookspecs import hookimpl
from benchkit.params import Params
from conftest import SHARED, randomize_bn

REF = SHARED / "reference"
CIFAR_NPZ = SHARED / "data" / "cifar10_test_first1017.npz"
N_DATA = 4                     # images per stand-in dataset (the run uses --limit 2)
MAX_CLASSIFIER_PARAMS = 2e6    # larger robustbench entries are swapped for a tiny net of their family
SHRINK = {"steps": 2, "eot": 2, "n_queries": 8, "n_iter": 2}
# Dataset plugin -> (what it needs installed, image side of its tensors)
DATASET_NEEDS = {"cifar10": (), "imagenet": ("robustbench", "PIL"), "celebahq": ("PIL",)}
CLASSIFIER_NEEDS = {"robustbench": ("robustbench",), "imagenet-torchvision": ("torchvision",),
                    "deit-s": ("timm",), "celebahq-attribute": (), "cifar10-resnet18": (),
                    "diffpure-cifar10": ()}


def needs(raw: dict) -> set[str]:
    mods = set(DATASET_NEEDS[raw["dataset"]["plugin"]])
    for c in raw["classifiers"]:
        mods |= set(CLASSIFIER_NEEDS[c["plugin"]])
    return mods


# ---------------------------------------------------------------- data in the on-disk formats

def write_cifar10(root: Path) -> None:
    """The shared test images as cifar-10-batches-py/test_batch (the pickle format)."""
    d = np.load(CIFAR_NPZ)
    (root / "cifar-10-batches-py").mkdir(parents=True)
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": d["y"].tolist(),
             b"data": d["x"].reshape(len(d["y"]), -1), b"filenames": [b"x.png"] * len(d["y"])}
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump(batch, f, protocol=2)


def write_imagenet(root: Path, params: dict, whole_split: bool) -> None:
    """val/<wnid>/<file>.JPEG for exactly the images the plugin will select; with whole_split, tiny
    images for the rest of RobustBench's 5,000 (the plugin checks every file it lists)."""
    from PIL import Image

    from benchkit_data.imagenet import authors_selected, selected

    authors = bool(params.get("authors_subset"))
    chosen = selected(params.get("n"), None if authors else params.get("subset_seed"))

    def write(i: int, rel: str) -> None:
        path = root / "val" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img = np.random.RandomState(i).randint(0, 256, (240 + 16 * i, 256, 3), dtype=np.uint8)
        Image.fromarray(img).save(path, quality=90)

    for i, (rel, _) in enumerate(chosen):
        write(i, rel)
    if whole_split:
        tiny = Image.fromarray(np.full((8, 8, 3), 128, dtype=np.uint8))
        for rel, _ in selected(None, None):
            path = root / "val" / rel
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                tiny.save(path)
    if authors:   # the authors draw over the whole folder: their images must be full size
        for i, (rel, _) in enumerate(authors_selected(root / "val", params["n"], params["authors_batch"], True)):
            write(i, rel)


def write_celebahq(root: Path, params: dict) -> None:
    """DiffPure's layout: images/<CelebA name>.png plus CelebA's attribute and partition files,
    for a handful of faces (the dataset then needs allow_partial)."""
    from PIL import Image

    from benchkit_data.celebahq import ATTRIBUTES

    split = {"train": 0, "val": 1, "test": 2}[params.get("split", "val")]
    names = [f"{i:06d}.jpg" for i in range(1, 2 * N_DATA + 1)]
    rng = np.random.RandomState(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, n in enumerate(names):
        vals = ["1" if (i + j) % 2 else "-1" for j in range(len(ATTRIBUTES))]
        rows.append(f"{n} " + " ".join(f"{v:>2}" for v in vals))
    (root / "list_attr_celeba.txt").write_text(f"{len(names)}\n" + " ".join(ATTRIBUTES) + "\n" + "\n".join(rows) + "\n")
    # half the faces in the suite's split, the rest in another one
    (root / "list_eval_partition.txt").write_text(
        "".join(f"{n} {split if i % 2 == 0 else (split + 1) % 3}\n" for i, n in enumerate(names)))
    (root / "images").mkdir()
    for n in names:
        Image.fromarray(rng.randint(0, 256, (256, 256, 3), dtype=np.uint8)).save(root / "images" / n.replace(".jpg", ".png"))


def patch_dataset(ds: dict, root: Path, whole_split: bool = False) -> None:
    params = ds.setdefault("params", {})
    params["root"] = str(root)
    params["n"] = N_DATA
    plugin = ds["plugin"]
    if params.get("authors_subset"):   # the authors' draws, N_DATA of them from data seed 0
        params["authors_batch"] = N_DATA
        if plugin == "imagenet":
            params["allow_partial"] = True
    if plugin == "cifar10":
        write_cifar10(root)
    elif plugin == "imagenet":
        write_imagenet(root, params, whole_split)
    elif plugin == "celebahq":
        params["allow_partial"] = True
        write_celebahq(root, params)
    else:
        raise AssertionError(f"no stand-in for dataset plugin {plugin!r}")


# ---------------------------------------------------------------- score models

def small_config(name: str) -> dict:
    return json.loads((REF / f"{name}_small_config.json").read_text())


def levels(size: int) -> list[int]:
    """Channel multipliers that bring `size` down to 8x8 before the middle block: the small reference
    configs stop at 16 // 2, which at 224-256 px would put self-attention over 16,384 positions."""
    n = max(2, (size // 8).bit_length())
    return [1] * (n - 1) + [2]


def score_checkpoint(model: str, size: int, out: Path) -> dict:
    """A random-weight score model of the suite's family at resolution `size`, saved in the published
    file layout; returns the diffpure plugin's score_params for it."""
    torch.manual_seed(0)
    if model == "ddpmpp":
        from benchkit_diffpure.architectures.ncsnpp import NCSNpp

        config = small_config("ncsnpp_cifar10")
        config["data"]["image_size"] = size
        net = NCSNpp.from_config(config)
        names = [n for n, _ in net.named_parameters()]
        state = net.state_dict()
        ckpt = {"model": {f"module.{k}": torch.zeros_like(v) for k, v in state.items()},
                "ema": {"decay": 0.9999, "num_updates": 1, "shadow_params": [state[n] for n in names]}, "step": 1}
        path = out / f"ddpmpp_{size}.pth"  # score_sde's checkpoint_8.pth layout
        torch.save(ckpt, path)
    elif model == "adm":
        from benchkit_diffpure.architectures.guided_unet import GuidedUNet

        config = small_config("guided_unet_imagenet256")
        config["image_size"] = size
        config["channel_mult"] = ",".join(map(str, levels(size)))
        config.pop("derived", None)
        net = GuidedUNet.from_config(config)
        path = out / f"adm_{size}.pt"  # guided-diffusion's bare state dict
        torch.save(net.state_dict(), path)
    elif model == "ddpm":
        from benchkit_diffpure.architectures.ddpm_unet import DDPMUNet

        config = small_config("ddpm_unet_celebahq")
        config["data"]["image_size"] = size
        config["model"]["ch_mult"] = levels(size)
        net = DDPMUNet.from_config(config)
        path = out / f"ddpm_{size}.ckpt"  # SDEdit's celeba_hq.ckpt: a bare state dict
        torch.save(net.state_dict(), path)
    else:
        raise AssertionError(f"no stand-in for score model {model!r}")
    return {"path": str(path), "config": config}


def patch_defense(d: dict, data_size: int, out: Path, cache: dict) -> None:
    if d["plugin"] != "diffpure":
        return
    p = d["params"]
    size = p.get("image_size") or data_size
    key = (p["score_model"], size)
    if key not in cache:
        cache[key] = score_checkpoint(p["score_model"], size, out)
    p["score_params"] = copy.deepcopy(cache[key])
    p["dt"] = min(p.get("t_star", 0.1) / 2, 0.1)  # two solver steps (five at t* = 0.5: the plugin caps dt at 0.1)


# ---------------------------------------------------------------- attacks

def shrink(params: dict) -> None:
    for k, v in params.items():
        if k in SHRINK and isinstance(v, int):
            params[k] = min(v, SHRINK[k])
        elif isinstance(v, dict):
            shrink(v)


# ---------------------------------------------------------------- classifiers

class StandinParams(Params):
    family: Literal["wideresnet", "resnet", "torchvision-resnet", "vit"]
    num_classes: int = 10


def standin_classifier(p: StandinParams) -> torch.nn.Module:
    """A tiny random-weight network of the family, seeded (eval mode, non-trivial BN statistics)."""
    torch.manual_seed(0)
    if p.family == "wideresnet":
        from benchkit_baselines.cifar_wideresnet import WideResNet

        net = WideResNet(10, 1, num_classes=p.num_classes)
    elif p.family == "resnet":
        from benchkit_baselines.cifar_resnet import CifarResNet

        net = CifarResNet((1, 1, 1, 1), bottleneck=True, num_classes=p.num_classes)
    elif p.family == "torchvision-resnet":
        from torchvision.models.resnet import BasicBlock, ResNet

        net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=p.num_classes)
    else:
        from timm.models.vision_transformer import VisionTransformer

        net = VisionTransformer(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=p.num_classes)
    return randomize_bn(net)


class StandinPlugin:
    """Registered by the stand-in test (in process, like any plugin)."""

    @hookimpl
    def register_classifiers(self, register):
        register("standin-classifier", standin_classifier, params=StandinParams,
                 description="test stand-in: a tiny random network of a classifier's architecture family")


def family(c: dict) -> tuple[str, int] | None:
    """(family, classes) of a classifier too costly for AutoAttack on one CPU thread (WRN-28-10 took
    8 minutes per 2-image shard), None to keep the suite's own plugin and architecture."""
    plugin, params = c["plugin"], c.get("params", {})
    if plugin == "robustbench":
        with torch.device("meta"):
            model = _zoo(params)["model"]()
        if sum(p.numel() for p in model.parameters()) <= MAX_CLASSIFIER_PARAMS:
            return None
        return ("wideresnet" if "WideResNet" in type(model).__name__ else "resnet",
                1000 if params.get("dataset") == "imagenet" else 10)
    if plugin == "diffpure-cifar10":
        return ("wideresnet" if params["arch"].startswith("wrn") else "resnet", 10)
    if plugin == "imagenet-torchvision":
        return ("torchvision-resnet", 1000)
    if plugin == "deit-s":
        return ("vit", 1000)
    return None


def patch_classifier(c: dict) -> None:
    """Swap classifiers too costly for a CPU test for a tiny network of the same family (the plugin
    that loads the published weights is tested on its own, in its file layout). The rest keep their
    plugin and architecture; their random weights are written by write_classifiers."""
    fam = family(c)
    if fam is not None:
        c["plugin"], c["params"] = "standin-classifier", {"family": fam[0], "num_classes": fam[1]}
        c["description"] = f"stand-in for {c['id']}: a tiny {fam[0]} (the real one is too costly for a CPU test)"


def _zoo(params: dict):
    from benchkit_baselines.robustbench import _alias_autoattack

    _alias_autoattack()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return model_dicts[BenchmarkDataset(params.get("dataset", "cifar10"))][ThreatModel(params.get("threat_model", "Linf"))][params["name"]]


def write_classifier(plugin: str, params: dict, path: Path) -> None:
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    if plugin == "robustbench":
        state = randomize_bn(_zoo(params)["model"]()).state_dict()
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # DataParallel checkpoint
    elif plugin == "diffpure-cifar10":
        from benchkit_baselines.diffpure_cifar import ARCHITECTURES

        state = randomize_bn(ARCHITECTURES[params["arch"]]()).state_dict()
        torch.save({f"module.{k}": v for k, v in state.items()}, path)  # DiffPure's DataParallel weights.pt
    elif plugin == "imagenet-torchvision":
        import torchvision

        torch.save(randomize_bn(getattr(torchvision.models, params["arch"])()).state_dict(), path)
    elif plugin == "deit-s":
        import timm

        net = timm.create_model("deit_small_patch16_224", pretrained=False)
        torch.save({"model": net.state_dict()}, path)  # the DeiT release format
    elif plugin == "celebahq-attribute":
        from benchkit_baselines.attribute_net import AttributeNet

        net = AttributeNet(256)
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 1)  # equalised learning rate: N(0, 1) weights, scaled at run time
        torch.save({"state_dict": net.state_dict(), "epoch": 1}, path)
    else:
        raise AssertionError(f"no stand-in weights for classifier plugin {plugin!r} ({path})")


def write_classifiers(suite_path: Path) -> None:
    """Every file the suite's classifiers declare, written with random weights where declared."""
    from benchkit.assets import suite_assets
    from benchkit.suite import load_suite

    suite = load_suite(suite_path)
    for where, _, path in suite_assets(suite, str(suite_path)):
        kind = where.rsplit(": ", 1)[1]
        if not kind.startswith("classifiers[") or path.exists():
            continue
        comp = suite.classifiers[int(kind[len("classifiers["):-1])]
        write_classifier(comp.plugin, dict(comp.params), path)


# ---------------------------------------------------------------- the whole suite

DATA_SIZE = {"cifar10": 32, "imagenet": 224, "celebahq": 256}


def standin_suite(raw: dict, tmp: Path) -> Path:
    """Patch a suite's merged dict to stand-in assets under tmp; returns the patched YAML's path.
    BENCHKIT_HOME must already point at a temporary folder (classifier weights are written there)."""
    raw = copy.deepcopy(raw)
    raw.pop("include", None)
    patch_dataset(raw["dataset"], tmp / "data", raw.get("eval", {}).get("clean_on") == "split")
    size = DATA_SIZE[raw["dataset"]["plugin"]]
    (tmp / "score").mkdir()
    cache: dict = {}
    for c in raw["classifiers"]:
        patch_classifier(c)
    for d in raw["defenses"]:
        patch_defense(d, size, tmp / "score", cache)
    for a in raw["attacks"]:
        if a["plugin"] == "autoattack":  # APGD/FAB iterations default to AutoAttack's 100
            a.setdefault("params", {})["n_iter"] = SHRINK["n_iter"]
        shrink(a.setdefault("params", {}))
    raw["eval"] = {**raw.get("eval", {}), "repeats": 2, "device": "cpu", "batch_size": 2}
    raw["checks"] = {**raw.get("checks", {}), "subset": 2}
    path = tmp / f"{raw['suite']}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    write_classifiers(path)
    return path
