"""The classifiers of DiffPure's ImageNet and CelebA-HQ tables: each architecture with seeded random
weights, saved in its published file format where the plugin looks (a temporary BENCHKIT_HOME),
loads back through the registry with identical logits; missing files are one line naming the path
and the published source. torchvision / timm ones skip without the robustbench extra. Also: the
paper suites validate, and `benchkit run` on them stops at once with the missing-file checklist."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from benchkit import registry
from benchkit.errors import BadInput, MissingAsset
from conftest import ROOT, randomize_bn

torch.set_num_threads(1)


@pytest.fixture
def home(tmp_path, monkeypatch, plugin_manager):
    monkeypatch.setenv("BENCHKIT_HOME", str(tmp_path))
    return tmp_path


def build(id, params=None):
    return registry.get("classifiers").get(id).build(params or {})


def images(n, size, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def normalized(x):
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------- CelebA-HQ attribute classifiers

# The state dict layout of gan-ensembling's D(3, resolution=256, fixed_size=True, use_mbstd=False),
# as read from its attribute_classifier.py (and DiffPure's copy, classifiers/attribute_net.py).
def expected_layout():
    nf = lambda s: min(int(8192 / 2 ** s), 512)  # noqa: E731
    keys = {"lod_in": (), "fromrgb_lod0.conv.conv.weight": (64, 3, 1, 1), "fromrgb_lod0.conv.wscale.b": (64,)}
    for res in range(8, 2, -1):
        r = f"{2 ** res}x{2 ** res}"
        cin, cout = nf(res - 1), nf(res - 2)
        keys |= {f"{r}.conv0.conv.weight": (cin, cin, 3, 3), f"{r}.conv0.wscale.b": (cin,),
                 f"{r}.conv1.conv.weight": (cout, cin, 3, 3), f"{r}.conv1.wscale.b": (cout,)}
    keys |= {"4x4.conv.conv.weight": (512, 512, 3, 3), "4x4.conv.wscale.b": (512,),
             "4x4.dense0.linear.weight": (512, 512 * 16), "4x4.dense0.wscale.b": (512,),
             "4x4.dense1.linear.weight": (1, 512), "4x4.dense1.wscale.b": (1,)}
    return keys


def test_attribute_net_has_the_published_state_dict_layout():
    from benchkit_baselines.attribute_net import AttributeNet

    state = AttributeNet(256).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_layout()
    assert state["lod_in"].dtype == torch.float64  # torch.from_numpy(np.array(0.0)) in the original


def test_attribute_classifier_roundtrip_from_a_training_checkpoint(home):
    """net_best.pth as gan-ensembling's make_checkpoint writes it: state_dict, optimizer, epoch, valacc."""
    from benchkit_baselines.attribute_net import AttributeNet

    torch.manual_seed(0)
    net = AttributeNet(256)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 1)  # equalised lr: weights N(0, 1), scaled at run time
    opt = torch.optim.Adam(net.parameters(), lr=0.0)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # an optimizer state with tensors, as in the published file
    path = home / "celebahq" / "classifiers" / "Smiling" / "net_best.pth"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": net.state_dict(), "optimizer": opt.state_dict(), "epoch": 7, "valacc": 0.9312}, path)

    model = build("celebahq-attribute", {"attribute": "Smiling"})
    assert not model.training
    x = images(1, 256)  # ~28 GMAC per 256x256 image: one keeps the test short
    with torch.no_grad():
        logit = net((x - 0.5) / 0.5)
        out = model(x)
        # 1024x1024 inputs are box-downsampled to 256 first (DiffPure's / gan-ensembling's downsample())
        big = model(x.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3))
    assert out.shape == (1, 2)
    torch.testing.assert_close(out, torch.cat([logit, -logit], 1), rtol=0, atol=0)
    torch.testing.assert_close(big, out, rtol=1e-5, atol=1e-5)
    # class 1 = attribute present = negative raw logit (trained with BCE on 1 - label)
    assert torch.equal(out.argmax(1), (logit[:, 0] < 0).long())


def test_attribute_classifier_missing_and_wrong_files(home):
    with pytest.raises(MissingAsset) as exc:
        build("celebahq-attribute", {"attribute": "Eyeglasses"})
    (line,) = exc.value.problems
    expected = home / "celebahq" / "classifiers" / "Eyeglasses" / "net_best.pth"
    assert line.startswith(f"missing file {expected}: get it from http://latent-composition.csail.mit.edu/"
                           "other_projects/gan_ensembling/zips/pretrained_classifiers.zip (Chai et al. 2021")
    expected.parent.mkdir(parents=True)
    torch.save({"state_dict": {"256x256.conv0.conv.weight": torch.zeros(1)}, "epoch": 1}, expected)
    with pytest.raises(MissingAsset, match=r"net_best.pth: not a gan-ensembling attribute classifier \(RuntimeError: "):
        build("celebahq-attribute", {"attribute": "Eyeglasses"})
    with pytest.raises(BadInput, match=r"unknown CelebA attribute 'smiling'; did you mean 'Smiling'\?"):
        build("celebahq-attribute", {"attribute": "smiling"})


# ---------------------------------------------------------------- ImageNet: torchvision, DeiT-S

@pytest.mark.parametrize("arch,file", [("resnet50", "resnet50-0676ba61.pth"),
                                       ("wide_resnet50_2", "wide_resnet50_2-95faca4d.pth")])
@pytest.mark.usefixtures("standin_weights")
def test_torchvision_roundtrip(arch, file, home):
    tv = pytest.importorskip("torchvision", reason="the robustbench extra is not installed")
    torch.manual_seed(0)
    net = randomize_bn(getattr(tv.models, arch)())
    path = home / "imagenet" / file
    path.parent.mkdir()
    torch.save(net.state_dict(), path)  # torchvision's files are bare state dicts
    model = build("imagenet-torchvision", {"arch": arch})
    x = images(2, 64)  # fully convolutional + adaptive pooling: a small input keeps the test fast
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(normalized(x)), rtol=0, atol=0)
    assert not model.training


@pytest.mark.usefixtures("standin_weights")
def test_deit_s_roundtrip_from_the_release_format(home):
    timm = pytest.importorskip("timm", reason="the robustbench extra is not installed")
    torch.manual_seed(0)
    net = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "cls_token" in name or "pos_embed" in name:
                p.normal_(0, 0.02)
    path = home / "imagenet" / "deit_small_patch16_224-cd65a155.pth"
    path.parent.mkdir()
    torch.save({"model": net.state_dict()}, path)  # the DeiT release: {'model': state_dict}
    model = build("deit-s")
    x = images(1, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(normalized(x)), rtol=0, atol=0)


def test_imagenet_missing_weights_name_path_and_url(home):
    cases = [("imagenet-torchvision", {"arch": "resnet50"}, "resnet50-0676ba61.pth",
              "https://download.pytorch.org/models/resnet50-0676ba61.pth (torchvision ResNet50_Weights.IMAGENET1K_V1"),
             ("imagenet-torchvision", {"arch": "wide_resnet50_2"}, "wide_resnet50_2-95faca4d.pth",
              "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth (torchvision Wide_ResNet50_2_Weights"),
             ("deit-s", {}, "deit_small_patch16_224-cd65a155.pth",
              "https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth (DeiT-S")]
    for id, params, file, source in cases:
        with pytest.raises(MissingAsset) as exc:
            build(id, params)
        (line,) = exc.value.problems
        assert line.startswith(f"missing file {home / 'imagenet' / file}: get it from {source}")
    with pytest.raises(MissingAsset, match=r"^missing file /nowhere/r50.pth: get it from https://download.pytorch.org"):
        build("imagenet-torchvision", {"path": "/nowhere/r50.pth"})


@pytest.mark.usefixtures("standin_weights")
def test_without_the_extra_building_says_what_to_install(home, monkeypatch):
    for file in ("resnet50-0676ba61.pth", "deit_small_patch16_224-cd65a155.pth"):
        (home / "imagenet").mkdir(exist_ok=True)
        torch.save({}, home / "imagenet" / file)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("torchvision", "timm") else find_spec(name, *a))
    with pytest.raises(BadInput) as exc:
        build("imagenet-torchvision")
    assert exc.value.problems == ["classifier 'imagenet-torchvision' needs torchvision (the robustbench extra): "
                                  "pip install -e '.[robustbench]'"]
    with pytest.raises(BadInput, match=r"^classifier 'deit-s' needs timm \(the robustbench extra\)"):
        build("deit-s")


# ---------------------------------------------------------------- the paper suites

SUITES = ["imagenet_linf_aa", "celebahq_bpda", "celebahq_bpda_smiling"]


def test_paper_suites_validate(plugin_manager, capsys):
    from benchkit.cli import main

    assert main(["validate"] + [str(ROOT / "suites" / f"{s}.yaml") for s in SUITES]) == 0
    assert capsys.readouterr().out.count(": ok (") == 3


def test_run_stops_at_once_with_the_missing_file_checklist(tmp_path):
    """`benchkit run suites/celebahq_bpda.yaml` on a machine without the files: exit 2, one line per
    missing file (dataset, classifier, score model), nothing run, no traceback."""
    env = {"BENCHKIT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", "import sys; from benchkit.cli import main; sys.exit(main())",
                           "run", "suites/celebahq_bpda.yaml", "--out", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == ("benchkit: error: 5 file(s) missing; nothing was run (`benchkit assets SUITE --download` "
                        "fetches what is published for download; or set BENCHKIT_HOME or the params' path):")
    home = tmp_path / "home"
    for path in [home / "celebahq" / "images", home / "celebahq" / "list_attr_celeba.txt",
                 home / "celebahq" / "list_eval_partition.txt",
                 home / "celebahq" / "classifiers" / "Eyeglasses" / "net_best.pth",
                 home / "diffpure" / "sdedit" / "celeba_hq.ckpt"]:
        assert any(line.startswith(f"benchkit: error: [MISSING] {path}  <- ") for line in lines), path
    assert len(lines) == 6   # one line per file: both DiffPure defenses' score model is listed once
    assert lines[-1].endswith("[suites/celebahq_bpda.yaml: defenses[1], defenses[2]]")
    assert not (tmp_path / "out").exists() and not home.exists()
