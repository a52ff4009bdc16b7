"""DiffPure's own CIFAR-10 classifiers (diffpure-cifar10): the architectures match independent
implementations (robustbench's TRADES WideResNet and CIFAR ResNet-50, when the extra is installed)
key for key and logit for logit; DataParallel checkpoints written where the plugin looks load back
through the registry with identical logits and the normalisation inside; bad files are one line."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from benchkit import registry
from benchkit.errors import MissingAsset
from conftest import randomize_bn

torch.set_num_threads(1)
needs_robustbench = pytest.mark.skipif(importlib.util.find_spec("robustbench") is None,
                                       reason="needs the robustbench extra")
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2471, 0.2435, 0.2616]).view(1, 3, 1, 1)


@pytest.fixture
def home(tmp_path, monkeypatch, plugin_manager):
    monkeypatch.setenv("BENCHKIT_HOME", str(tmp_path))
    return tmp_path


def images(n=3, seed=1):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def params(model):
    return sum(p.numel() for p in model.parameters())


def test_full_size_architectures_have_the_published_parameter_counts():
    from benchkit_baselines.diffpure_cifar import ARCHITECTURES

    with torch.device("meta"):
        wrn, r50 = ARCHITECTURES["wrn-70-16-dropout"](), ARCHITECTURES["resnet-50"]()
    # Counted from robustbench's WideResNet(depth=70, widen_factor=16) and ResNet50() (same layouts).
    assert params(wrn) == 266_796_506
    assert params(r50) == 23_520_842
    assert len(wrn.state_dict()) == 407 and "block3.layer.10.convShortcut.weight" not in wrn.state_dict()


def _robustbench_arch(name):
    from benchkit_baselines.robustbench import _alias_autoattack

    _alias_autoattack()
    if name == "wrn":
        from robustbench.model_zoo.architectures.wide_resnet import WideResNet
        return WideResNet(depth=16, widen_factor=2, dropRate=0.3)
    from robustbench.model_zoo.architectures.resnet import ResNet50
    return ResNet50()


@needs_robustbench
@pytest.mark.parametrize("name", ["wrn", "resnet50"])
def test_architectures_match_robustbench_implementations(name):
    from benchkit_baselines.cifar_resnet import resnet50
    from benchkit_baselines.cifar_wideresnet import WideResNet

    torch.manual_seed(0)
    theirs = randomize_bn(_robustbench_arch(name))
    ours = WideResNet(16, 2, dropout=0.3) if name == "wrn" else resnet50()
    ours.load_state_dict(theirs.state_dict())  # strict: same keys and shapes
    x = images()
    with torch.no_grad():
        a, b = ours.eval()(x), theirs(x)
    assert torch.allclose(a, b, atol=1e-5 * b.abs().max().item(), rtol=0), (a - b).abs().max()


def _small_wrn():
    from benchkit_baselines.cifar_wideresnet import WideResNet

    return WideResNet(16, 2, dropout=0.3)


@pytest.mark.parametrize("arch", ["wrn-70-16-dropout", "resnet-50"])
def test_data_parallel_checkpoint_roundtrips_through_the_registry(arch, home, monkeypatch):
    """weights.pt as DiffPure's training wrote it (nn.DataParallel: 'module.' keys), at
    BENCHKIT_HOME/diffpure/cifar10/<arch>/weights.pt; WRN-70-16 shrunk to WRN-16-2 (same code path)."""
    from benchkit_baselines import diffpure_cifar
    from benchkit_baselines.cifar_resnet import resnet50

    monkeypatch.setitem(diffpure_cifar.ARCHITECTURES, "wrn-70-16-dropout", _small_wrn)
    torch.manual_seed(0)
    net = randomize_bn(_small_wrn() if arch == "wrn-70-16-dropout" else resnet50())
    path = home / "diffpure" / "cifar10" / arch / "weights.pt"
    path.parent.mkdir(parents=True)
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)

    model = registry.get("classifiers").get("diffpure-cifar10").build({"arch": arch})
    assert not model.training
    x = images()
    with torch.no_grad():
        got, again = model(x), model(x)
        want = net((x - MEAN) / STD)
    assert torch.equal(got, again)  # dropout off in eval
    assert torch.allclose(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)


def test_missing_and_wrong_files_are_one_line_errors(home):
    entry = registry.get("classifiers").get("diffpure-cifar10")
    with pytest.raises(MissingAsset) as exc:
        entry.build({"arch": "resnet-50"})
    msg = str(exc.value)
    assert "\n" not in msg and str(home / "diffpure/cifar10/resnet-50/weights.pt") in msg
    assert "drive.google.com/drive/folders/1SEGilIEAnx9OC1JVhmOynreCF3oog7Fi" in msg

    from benchkit_baselines.cifar_resnet import resnet18

    wrong = home / "r18.pt"
    torch.save(resnet18().state_dict(), wrong)
    with pytest.raises(MissingAsset, match=r"not DiffPure's cifar10-resnet-50 weights .*published file") as exc:
        entry.build({"arch": "resnet-50", "path": str(wrong)})
    assert "\n" not in str(exc.value)
