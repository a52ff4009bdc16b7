"""RobustBench model-zoo classifiers, loaded offline with robustbench's own ``load_model``.

robustbench (the ``robustbench`` extra, pinned to 1.1.1) downloads a missing checkpoint from
Google Drive, or through ``torch.hub`` for the few entries built by torchvision or timm with
``pretrained=True``. We never let it: every file ``load_model`` will read is declared as an asset
and checked before the call, and during the call robustbench's and torch.hub's download functions
raise instead of fetching anything.

Where robustbench 1.1.1 reads the files (``model_dir`` defaults to BENCHKIT_HOME/robustbench):

* most entries:           model_dir/<dataset>/<threat_model>/<name>.pt
  (a ``{'state_dict': ...}`` dict or a bare state dict; ``module.`` and ``model.`` prefixes are
  stripped by load_model), from ``https://drive.google.com/uc?id=<gdrive_id>``;
* ensembles (gdrive_id is a list): model_dir/<dataset>/<threat_model>/<name>.pt_m<i>.pt;
* ImageNet ``Standard_R50`` (torchvision's ResNet-50) and the timm-registered entries
  (XCiT, DeiT, AlexNet): torch.hub's cache, which we point at model_dir/hub, so
  model_dir/hub/checkpoints/<file name of the published URL>.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib.util
import pickle
import sys
import warnings
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from benchkit.assets import Asset, home, load_state_dict
from benchkit.errors import BadInput, MissingAsset
from benchkit.params import Params

INSTALL_HINT = "pip install -e '.[robustbench]'"
ZOO_FILE = {"cifar10": "cifar10.py", "cifar100": "cifar100.py", "imagenet": "imagenet.py"}


class RobustBenchParams(Params):
    name: str = Field(description="RobustBench model zoo name, e.g. 'Standard' or 'Gowal2020Uncovering_70_16_extra'")
    dataset: Literal["cifar10", "cifar100", "imagenet"] = "cifar10"
    threat_model: Literal["Linf", "L2", "corruptions"] = "Linf"
    model_dir: str | None = Field(None, description="robustbench's model_dir (default: BENCHKIT_HOME/robustbench)")

    @model_validator(mode="after")
    def _in_zoo(self):
        # Without the extra the name cannot be checked here; building or listing assets says what to install.
        try:
            _import_robustbench()
        except BadInput:
            return self
        try:
            _files(self)
        except BadInput as exc:  # pydantic reports ValueErrors under the params' location
            raise ValueError(exc.problems[0]) from None
        return self


def _alias_autoattack() -> None:
    """robustbench imports `autoattack` (the GitHub package); PyPI ships it as `pyautoattack`."""
    if "autoattack" in sys.modules or importlib.util.find_spec("autoattack") is not None:
        return
    import pyautoattack
    import pyautoattack.state

    sys.modules["autoattack"] = pyautoattack
    sys.modules["autoattack.state"] = pyautoattack.state


def _import_robustbench():
    """robustbench.utils (load_model and the model zoo tables); BadInput if the extra is missing."""
    if importlib.util.find_spec("robustbench") is None:
        raise BadInput(f"classifier 'robustbench' needs the robustbench extra: {INSTALL_HINT}")
    try:
        _alias_autoattack()
        with warnings.catch_warnings():  # import-time deprecation noise of robustbench's dependencies
            warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated")
            warnings.filterwarnings("ignore", message=".*torch.jit.interface.* is deprecated")
            import robustbench.utils
    except ImportError as exc:
        raise BadInput(f"robustbench is installed but cannot be imported ({type(exc).__name__}: {exc}); "
                       f"reinstall the extra: {INSTALL_HINT}") from None
    return robustbench.utils


def _model_dir(p: RobustBenchParams) -> Path:
    return Path(p.model_dir).expanduser() if p.model_dir else home() / "robustbench"


def _asset(p: RobustBenchParams, sub: str, source: str, url: str, sha256_prefix: str | None = None
           ) -> tuple[Asset, str | None]:
    """An asset at model_dir/sub: relative to BENCHKIT_HOME by default, explicit when model_dir is set.
    `url` is where robustbench itself fetches it (Google Drive: gdown, as robustbench does)."""
    explicit = str(_model_dir(p) / sub) if p.model_dir else None
    return Asset(f"robustbench/{sub}", source, url=url, sha256_prefix=sha256_prefix), explicit


def _files(p: RobustBenchParams) -> list[tuple[Asset, str | None]]:
    """Every file robustbench 1.1.1's load_model reads for this entry, with its published source."""
    rb = _import_robustbench()
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    models = rb.all_models[BenchmarkDataset(p.dataset)][ThreatModel(p.threat_model)]
    where = f"{p.dataset}/{p.threat_model}"
    if p.name not in models:
        close = difflib.get_close_matches(p.name, list(models), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else f" ({len(models)} entries; see robustbench's model zoo)"
        raise BadInput(f"unknown RobustBench model '{p.name}' for {where}{hint}")
    entry = f"RobustBench model zoo {where} '{p.name}', robustbench 1.1.1 model_zoo/{ZOO_FILE[p.dataset]}"

    # Same lookup order as load_model: timm-registered names first (weights from a URL via torch.hub).
    timm_name = f"{p.name.lower().replace('-', '_')}_{p.dataset}_{p.threat_model.lower()}"
    if rb.timm.is_model(timm_name):
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(timm_name)
        url = getattr(cfg, "url", None) if cfg is not None else None
        if not url or getattr(cfg, "hf_hub_id", None):
            raise BadInput(f"RobustBench model '{p.name}' ({where}) loads through timm from a source other than a URL; "
                           "not supported offline")
        return [_asset(p, f"hub/checkpoints/{Path(url.split('?')[0]).name}", f"{url} ({entry}, timm '{timm_name}')",
                       url)]

    gdrive = models[p.name]["gdrive_id"]
    if gdrive is None:
        raise BadInput(f"RobustBench model '{p.name}' ({where}) has no published checkpoint that "
                       "robustbench 1.1.1's load_model can load")
    if p.dataset == "imagenet" and "Standard" in p.name:
        # load_model returns the architecture as built: torchvision's pretrained weights, via torch.hub.
        if p.name != "Standard_R50":
            raise BadInput(f"RobustBench model '{p.name}' ({where}): unknown torchvision weights; not supported offline")
        from torchvision.models import ResNet50_Weights

        url = ResNet50_Weights.IMAGENET1K_V1.url
        # torchvision loads it with check_hash=True: the hex in the name is the start of its sha256
        return [_asset(p, f"hub/checkpoints/{Path(url).name}", f"{url} (torchvision ResNet50_Weights.IMAGENET1K_V1; {entry})",
                       url, sha256_prefix=Path(url).stem.rsplit("-", 1)[1])]
    stem = f"{p.dataset}/{p.threat_model}/{p.name}.pt"
    if isinstance(gdrive, list):
        return [_asset(p, f"{stem}_m{i}.pt", f"https://drive.google.com/uc?id={gid} ({entry}, member {i})",
                       f"https://drive.google.com/uc?id={gid}") for i, gid in enumerate(gdrive)]
    return [_asset(p, stem, f"https://drive.google.com/uc?id={gdrive} ({entry})", f"https://drive.google.com/uc?id={gdrive}")]


def robustbench_assets(p: RobustBenchParams) -> list[tuple[Asset, str | None]]:
    """The files load_model reads; without the extra installed, the usual single-file layout
    (so the missing-asset checklist is complete either way; building still needs the extra)."""
    if importlib.util.find_spec("robustbench") is None:
        path = _model_dir(p) / p.dataset / p.threat_model / f"{p.name}.pt"
        return [(Asset(str(path), f"RobustBench model zoo entry '{p.name}' (needs {INSTALL_HINT})"), str(path))]
    return _files(p)


def _refuse_download(*args, **kwargs):
    target = next((str(a) for a in args if isinstance(a, (str, Path))), "?")
    raise MissingAsset(f"robustbench tried to download {target}: nothing is downloaded at run time "
                       "(a file the robustbench plugin does not know about; place it under model_dir)")


@contextlib.contextmanager
def _offline(rb, hub_dir: Path):
    """torch.hub's cache at hub_dir and every download path of robustbench / torch.hub disabled."""
    saved = {(rb, "download_gdrive_new"): rb.download_gdrive_new, (rb, "download_gdrive"): rb.download_gdrive,
             (torch.hub, "download_url_to_file"): torch.hub.download_url_to_file}
    hub_saved = getattr(torch.hub, "_hub_dir", None)
    try:
        for obj, attr in saved:
            setattr(obj, attr, _refuse_download)
        torch.hub.set_dir(str(hub_dir))
        yield
    finally:
        for (obj, attr), fn in saved.items():
            setattr(obj, attr, fn)
        torch.hub._hub_dir = hub_saved


def robustbench_classifier(p: RobustBenchParams) -> torch.nn.Module:
    rb = _import_robustbench()
    files = _files(p)
    paths, missing = [], []
    for asset, explicit in files:
        try:
            paths.append(asset.require(explicit))
        except MissingAsset as exc:
            missing.extend(exc.problems)
    if missing:
        raise MissingAsset(missing)
    model_dir = _model_dir(p)
    for path in paths:
        if path.parent.name == "checkpoints" and path.parent.parent == model_dir / "hub":
            # torch.hub / torchvision unpickle without weights_only: check the file is plain tensors first.
            load_state_dict(path)
    try:
        with _offline(rb, model_dir / "hub"), warnings.catch_warnings():
            # robustbench builds torchvision models with the deprecated pretrained=True
            warnings.filterwarnings("ignore", message=".*'pretrained' is deprecated", module="torchvision")
            warnings.filterwarnings("ignore", message="Arguments other than a weight enum", module="torchvision")
            model = rb.load_model(model_name=p.name, dataset=p.dataset, threat_model=p.threat_model,
                                  model_dir=str(model_dir))
    except (RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        first = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])
        first = first if len(first) <= 300 else first[:300] + "..."
        raise MissingAsset(f"{', '.join(map(str, paths))}: robustbench's load_model cannot load it as "
                           f"'{p.name}' ({type(exc).__name__}: {first}); is it the published file?") from None
    return model.eval()
