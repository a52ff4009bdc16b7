"""The `robustbench` classifier: zoo architectures with seeded random weights saved where robustbench
1.1.1's load_model reads them (under a temporary BENCHKIT_HOME), loaded back through the plugin,
give the logits of the directly built model; missing files, the asset checklist and suite
validation. Nothing is downloaded."""
from __future__ import annotations

import pytest
import torch

from benchkit_baselines.robustbench import _alias_autoattack

_alias_autoattack()  # robustbench imports `autoattack`; PyPI ships it as pyautoattack
pytest.importorskip("robustbench", reason="the robustbench extra is not installed (pip install -e '.[robustbench]')")

from robustbench.model_zoo import model_dicts  # noqa: E402
from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel  # noqa: E402

from benchkit import registry  # noqa: E402
from benchkit.cli import main  # noqa: E402
from benchkit.errors import BadInput, MissingAsset  # noqa: E402
from conftest import randomize_bn, write  # noqa: E402

torch.set_num_threads(1)


def zoo_model(name, dataset="cifar10", threat_model="Linf"):
    return model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)][name]


def random_model(name, dataset="cifar10", threat_model="Linf", seed=0):
    """The zoo architecture with seeded random weights and non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    return randomize_bn(zoo_model(name, dataset, threat_model)["model"]())


def build(params):
    return registry.get("classifiers").get("robustbench").build(params)


@pytest.fixture
def home(tmp_path, monkeypatch, plugin_manager):
    monkeypatch.setenv("BENCHKIT_HOME", str(tmp_path))
    return tmp_path


def check_roundtrip(home, name, wrap, size=32):
    model = random_model(name)
    state = model.state_dict()
    path = home / "robustbench" / "cifar10" / "Linf" / f"{name}.pt"
    path.parent.mkdir(parents=True)
    torch.save(wrap(state), path)
    loaded = build({"name": name, "dataset": "cifar10", "threat_model": "Linf"})
    assert loaded is not model and not loaded.training
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = model(x), loaded(x)
    assert out.shape == (3, 10)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_standard_wrn_28_10_from_a_dataparallel_checkpoint(home):
    """'Standard' (WRN-28-10, no normalisation) saved as {'state_dict': {'module.' + key: ...}}."""
    check_roundtrip(home, "Standard", lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}})


def test_preact_resnet18_from_a_bare_state_dict(home):
    """'Rebuffi2021Fixing_R18_ddpm' (DeepMind PreAct ResNet-18, normalises inside) saved as a bare state dict."""
    check_roundtrip(home, "Rebuffi2021Fixing_R18_ddpm", lambda s: dict(s))


@pytest.mark.slow
def test_wrn_70_16_full_roundtrip(home):
    """The paper's WRN-70-16 (267M parameters, ~1 GB file): a full save / load / logits round trip."""
    check_roundtrip(home, "Gowal2020Uncovering_70_16_extra", lambda s: {"state_dict": dict(s)})


@pytest.mark.parametrize("name", ["Gowal2020Uncovering_70_16_extra", "Rebuffi2021Fixing_70_16_cutmix_extra"])
def test_wrn_70_16_architecture_on_meta_device(name, home):
    """WRN-70-16 built without memory: its size and that load_model's key handling of a DataParallel
    checkpoint gives exactly its keys (the full round trip is the slow test above)."""
    from robustbench.utils import rm_substr_from_state_dict

    with torch.device("meta"):
        model = zoo_model(name)["model"]()
    assert 266_000_000 < sum(p.numel() for p in model.parameters()) < 268_000_000
    keys = list(model.state_dict())
    assert list(rm_substr_from_state_dict(dict.fromkeys(f"module.{k}" for k in keys), "module.")) == keys
    (asset, explicit), = registry.get("classifiers").get("robustbench").assets(
        registry.get("classifiers").get("robustbench").validate({"name": name}, "c"))
    assert explicit is None and asset.path == home / "robustbench" / "cifar10" / "Linf" / f"{name}.pt"


@pytest.mark.usefixtures("standin_weights")
def test_imagenet_standard_r50_from_the_torch_hub_cache_under_model_dir(home):
    """ImageNet 'Standard_R50' is torchvision's pretrained ResNet-50: read from torch.hub's cache,
    which the plugin points at model_dir/hub for the call only."""
    import torchvision
    from robustbench.model_zoo.architectures.utils_architectures import normalize_model

    torch.manual_seed(0)
    net = torchvision.models.resnet50().eval()
    path = home / "robustbench" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    path.parent.mkdir(parents=True)
    torch.save(net.state_dict(), path)
    hub_before = torch.hub.get_dir()
    loaded = build({"name": "Standard_R50", "dataset": "imagenet"})
    assert torch.hub.get_dir() == hub_before
    ref = normalize_model(net, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref(x), rtol=0, atol=0)


def test_timm_registered_xcit_from_the_torch_hub_cache_under_model_dir(home):
    """'Debenedetti2022Light_XCiT-S12' has no gdrive id: load_model builds it with timm
    (pretrained=True), whose weights come from torch.hub's cache, here model_dir/hub."""
    import timm

    torch.manual_seed(0)
    net = timm.create_model("debenedetti2022light_xcit_s12_cifar10_linf", num_classes=10, pretrained=False).eval()
    path = home / "robustbench" / "hub" / "checkpoints" / "debenedetti2022light-xcit-s-cifar10-linf.pth.tar"
    path.parent.mkdir(parents=True)
    torch.save({"model": net.model.state_dict()}, path)  # the inner XCiT; the wrapper normalises
    loaded = build({"name": "Debenedetti2022Light_XCiT-S12"})
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


def test_a_wrong_file_is_one_line_naming_it(home):
    path = home / "robustbench" / "cifar10" / "Linf" / "Standard.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, path)
    with pytest.raises(MissingAsset) as exc:
        build({"name": "Standard"})
    (line,) = exc.value.problems
    assert line.startswith(f"{path}: robustbench's load_model cannot load it as 'Standard' (RuntimeError: ")


def test_missing_checkpoint_names_path_and_source(home):
    with pytest.raises(MissingAsset) as exc:
        build({"name": "Standard"})
    (line,) = exc.value.problems
    expected = home / "robustbench" / "cifar10" / "Linf" / "Standard.pt"
    assert line.startswith(f"missing file {expected}: get it from https://drive.google.com/uc?id=1t98aEuzeTL8P7Kpd5DIrCoCL21BNZUhC ")
    assert "RobustBench model zoo cifar10/Linf 'Standard'" in line
    assert not expected.parent.exists()  # nothing created, nothing fetched


def test_explicit_model_dir_and_ensembles_list_every_member(tmp_path, home):
    with pytest.raises(MissingAsset) as exc:
        build({"name": "Chen2020Adversarial", "model_dir": str(tmp_path / "rb")})
    assert [line.split(":")[0] for line in exc.value.problems] == [
        f"missing file {tmp_path / 'rb' / 'cifar10' / 'Linf'}/Chen2020Adversarial.pt_m{i}.pt" for i in range(3)]
    assert all("https://drive.google.com/uc?id=" in line for line in exc.value.problems)


def test_download_paths_are_disabled_during_load(home):
    """Were a file to slip past the checks, load_model's download would raise instead of fetching."""
    import robustbench.utils as rbu
    from benchkit_baselines.robustbench import _offline

    original = rbu.download_gdrive_new
    with _offline(rbu, home / "hub"), pytest.raises(MissingAsset, match="tried to download"):
        rbu.load_model("Standard", model_dir=str(home), dataset="cifar10", threat_model="Linf")
    assert rbu.download_gdrive_new is original and torch.hub.download_url_to_file.__name__ == "download_url_to_file"


def test_params_are_validated_against_the_zoo(plugin_manager):
    entry = registry.get("classifiers").get("robustbench")
    with pytest.raises(BadInput, match=r"c.params: (Value error, )?unknown RobustBench model 'Standrd' for cifar10/Linf; did you mean 'Standard'\?"):
        entry.validate({"name": "Standrd"}, "c")
    with pytest.raises(BadInput, match=r"c.params.threat_model: Input should be 'Linf', 'L2' or 'corruptions'"):
        entry.validate({"name": "Standard", "threat_model": "L1"}, "c")
    # timm-registered entries (no gdrive id) read torch.hub's cache: model_dir/hub/checkpoints/<URL file name>
    (asset, explicit), = entry.assets(entry.validate({"name": "Debenedetti2022Light_XCiT-S12", "model_dir": "/x/rb"}, "c"))
    assert explicit == "/x/rb/hub/checkpoints/debenedetti2022light-xcit-s-cifar10-linf.pth.tar"
    assert asset.source.startswith("https://github.com/RobustBench/robustbench/releases/download/v1.1/")


SUITE = """
suite: rb
dataset: {plugin: digits, params: {split: test, n: 8}}
classifiers: [{id: wrn, plugin: robustbench, params: {name: NAME, dataset: cifar10, threat_model: Linf}}]
defenses: [{id: none, plugin: identity}]
attacks: [{id: aa, plugin: autoattack, params: {eps: 8/255}}]
eval: {batch_size: 8, repeats: 1}
grid: all
"""


def test_suite_validates_and_lists_the_checkpoint(tmp_path, home, capsys):
    good = write(tmp_path / "good.yaml", SUITE.replace("NAME", "Standard"))
    assert main(["validate", str(good)]) == 0
    assert main(["assets", str(good)]) == 2  # missing
    out = capsys.readouterr().out
    assert f"[MISSING] {home / 'robustbench/cifar10/Linf/Standard.pt'}  <- https://drive.google.com/uc?id=" in out
    bad = write(tmp_path / "bad.yaml", SUITE.replace("NAME", "Standrd"))
    assert main(["validate", str(bad)]) == 2
    assert "did you mean 'Standard'?" in capsys.readouterr().err


def test_without_the_extra_validation_passes_and_building_says_what_to_install(tmp_path, home, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "robustbench" else find_spec(name, *a))
    good = write(tmp_path / "good.yaml", SUITE.replace("NAME", "Standard"))
    assert main(["validate", str(good)]) == 0  # like a missing checkpoint, a missing extra is the machine's, not the suite's
    capsys.readouterr()
    assert main(["assets", str(good)]) == 2  # still a complete checklist: the usual single-file layout
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"[MISSING] {home}/robustbench/cifar10/Linf/Standard.pt  <- RobustBench model zoo entry 'Standard' "
                           "(needs pip install -e '.[robustbench]')"), line
    with pytest.raises(BadInput, match=r"^classifier 'robustbench' needs the robustbench extra: pip install -e '\.\[robustbench\]'$"):
        build({"name": "Standard"})
