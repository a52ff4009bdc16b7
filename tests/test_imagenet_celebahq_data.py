"""The imagenet and celebahq datasets on their real on-disk layouts, with stand-in files.

ImageNet: val/<wnid>/<file>.JPEG, RobustBench's 5,000-image list and class map (needs the
robustbench extra); CelebA-HQ: DiffPure's layout (images/<CelebA name>.png + CelebA's attribute and
partition files) and CelebAMask-HQ's (CelebA-HQ-img/<i>.jpg + its attribute file + mapping). The
preprocessing is compared pixel for pixel with torchvision's transforms where torchvision is
installed; index, labels and splits are tested everywhere (no image decoding needed).
"""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from benchkit import registry
from benchkit.errors import BadInput, MissingAsset
from benchkit_data.celebahq import ATTRIBUTES

torch.set_num_threads(1)


def dataset(id, params):
    return registry.get("datasets").get(id).build(params)


def hide(monkeypatch, module):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else find_spec(name, *a))


# ---------------------------------------------------------------- CelebA-HQ stand-in

# 12 CelebA names in *unsorted* order (DiffPure sorts them), their partition and Eyeglasses / Smiling.
NAMES = ["000104.jpg", "000004.jpg", "000231.jpg", "000009.jpg", "000777.jpg", "000014.jpg",
         "001002.jpg", "000052.jpg", "000300.jpg", "000061.jpg", "000500.jpg", "000088.jpg"]
PART = dict(zip(NAMES, [1, 0, 1, 2, 1, 0, 1, 1, 2, 1, 0, 1]))
EYE = dict(zip(NAMES, [1, 0, 0, 1, 1, 0, 0, 1, 0, 0, 1, 1]))
SMILE = dict(zip(NAMES, [0, 1, 1, 0, 1, 0, 1, 0, 0, 1, 1, 0]))


def attr_file(path, keys, names_for_values):
    """A CelebA-style attribute file: count, the 40 names, then one +-1 row per key."""
    rows = []
    for key, celeba in zip(keys, names_for_values):
        vals = ["-1"] * len(ATTRIBUTES)
        vals[ATTRIBUTES.index("Eyeglasses")] = "1" if EYE[celeba] else "-1"
        vals[ATTRIBUTES.index("Smiling")] = "1" if SMILE[celeba] else "-1"
        rows.append(f"{key} " + " ".join(f"{v:>2}" for v in vals))
    path.write_text(f"{len(keys)}\n" + " ".join(ATTRIBUTES) + "\n" + "\n".join(rows) + "\n")


def celeba_files(root, extra_celeba_rows=("200000.jpg",)):
    """CelebA's own files: they list more images than CelebA-HQ has (here one extra)."""
    root.mkdir(parents=True, exist_ok=True)
    for n in extra_celeba_rows:
        PART[n], EYE[n], SMILE[n] = 0, 1, 1
    allnames = sorted(NAMES) + list(extra_celeba_rows)
    attr_file(root / "list_attr_celeba.txt", allnames, allnames)
    (root / "list_eval_partition.txt").write_text("".join(f"{n} {PART[n]}\n" for n in allnames))


def image_array(seed, size=512):
    return np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)


def diffpure_layout(root, real_images=False):
    celeba_files(root)
    (root / "images").mkdir()
    for i, n in enumerate(NAMES):
        p = root / "images" / n.replace(".jpg", ".png")
        if real_images:
            from PIL import Image
            Image.fromarray(image_array(i)).save(p)
        else:
            p.write_bytes(b"")
    return root


def celebamask_layout(root, real_images=False):
    """CelebAMask-HQ: image i is NAMES[i] of CelebA (the mapping says so)."""
    celeba_files(root)
    (root / "CelebA-HQ-img").mkdir()
    keys = [f"{i}.jpg" for i in range(len(NAMES))]
    attr_file(root / "CelebAMask-HQ-attribute-anno.txt", keys, NAMES)
    (root / "CelebA-HQ-to-CelebA-mapping.txt").write_text(
        "idx         orig_idx        orig_file\n" + "".join(f"{i} {int(n[:6]) - 1} {n}\n" for i, n in enumerate(NAMES)))
    for i, k in enumerate(keys):
        p = root / "CelebA-HQ-img" / k
        if real_images:
            from PIL import Image
            Image.fromarray(image_array(i)).save(p, quality=95)
        else:
            p.write_bytes(b"")
    return root


def test_celebahq_index_follows_diffpure_order_split_and_labels(tmp_path, plugin_manager):
    from benchkit_data.celebahq import index

    root = diffpure_layout(tmp_path / "dp")
    rows = index(root, "diffpure", "Eyeglasses", allow_partial=True)
    ordered = sorted(NAMES)  # DiffPure: sorted(os.listdir(images)), png -> jpg to look up CelebA's files
    assert [p.name for p, _, _ in rows] == [n.replace(".jpg", ".png") for n in ordered]
    assert [(y, part) for _, y, part in rows] == [(EYE[n], PART[n]) for n in ordered]
    smiling = index(root, "diffpure", "Smiling", allow_partial=True)
    assert [y for _, y, _ in smiling] == [SMILE[n] for n in ordered]

    mask = celebamask_layout(tmp_path / "mask")
    rows_mask = index(mask, "celebamask-hq", "Eyeglasses")
    # the same faces in the same order: image i of CelebAMask-HQ sits where its CelebA name sorts
    assert [NAMES[int(p.stem)] for p, _, _ in rows_mask] == ordered
    assert [(y, part) for _, y, part in rows_mask] == [(y, part) for _, y, part in rows]


def test_celebahq_partial_folder_is_refused_unless_allowed(tmp_path, plugin_manager):
    root = diffpure_layout(tmp_path)
    with pytest.raises(BadInput, match=r"12 images, not CelebA-HQ's 30,000; .*allow_partial: true"):
        dataset("celebahq", {"root": str(root)})


@pytest.mark.parametrize("layout", ["diffpure", "celebamask-hq"])
def test_celebahq_missing_files_are_named_with_their_source(tmp_path, layout, plugin_manager, monkeypatch):
    monkeypatch.setenv("BENCHKIT_HOME", str(tmp_path))
    with pytest.raises(MissingAsset) as exc:
        dataset("celebahq", {"layout": layout})
    lines = exc.value.problems
    names = {"diffpure": ["images", "list_attr_celeba.txt", "list_eval_partition.txt"],
             "celebamask-hq": ["CelebA-HQ-img", "CelebAMask-HQ-attribute-anno.txt", "CelebA-HQ-to-CelebA-mapping.txt",
                               "list_eval_partition.txt"]}[layout]
    assert [line.split(":")[0] for line in lines] == [
        f"missing {'folder' if '.' not in n else 'file'} {tmp_path / 'celebahq' / n}" for n in names]
    assert all("get it from " in line and "https://" in line for line in lines)
    entry = registry.get("datasets").get("celebahq")
    assert [str(p) for _, p in entry.assets(entry.validate({"layout": layout}, "d"))] == \
        [str(tmp_path / "celebahq" / n) for n in names]


def test_celebahq_params(plugin_manager):
    entry = registry.get("datasets").get("celebahq")
    with pytest.raises(BadInput, match=r"d.params.attribute: Value error, unknown CelebA attribute 'Eyeglass'; did you mean 'Eyeglasses'\?"):
        entry.validate({"attribute": "Eyeglass"}, "d")
    assert entry.validate({}, "d").split == "val"  # DiffPure evaluates CelebA's val partition


@pytest.mark.parametrize("layout", ["diffpure", "celebamask-hq"])
def test_celebahq_images_match_torchvision_resize_256(tmp_path, layout, plugin_manager):
    pytest.importorskip("PIL", reason="Pillow (comes with the robustbench extra) decodes the images")
    build = diffpure_layout if layout == "diffpure" else celebamask_layout
    root = build(tmp_path / layout, real_images=True)
    params = {"root": str(root), "layout": layout, "attribute": "Smiling", "n": 3, "subset_seed": 1,
              "allow_partial": True}
    ds = dataset("celebahq", params)
    val = [n for n in sorted(NAMES) if PART[n] == 1]  # 7 val images in DiffPure's order
    picked = [val[i] for i in np.sort(np.random.RandomState(1).permutation(len(val))[:3])]
    x, y = ds.get(range(3))
    assert x.shape == (3, 3, 256, 256) and x.dtype == torch.float32 and len(ds) == 3 and ds.num_classes == 2
    assert y.tolist() == [SMILE[n] for n in picked]
    assert torch.equal(dataset("celebahq", params).get([2, 0])[0], x[[2, 0]])
    tv = pytest.importorskip("torchvision.transforms")
    from PIL import Image

    reference = tv.Compose([tv.Resize(256), tv.ToTensor()])
    for i, n in enumerate(picked):
        path = root / "images" / n.replace(".jpg", ".png") if layout == "diffpure" else \
            root / "CelebA-HQ-img" / f"{NAMES.index(n)}.jpg"
        assert torch.equal(x[i], reference(Image.open(path).convert("RGB")))


# ---------------------------------------------------------------- ImageNet

def test_imagenet_without_robustbench_says_what_to_install(tmp_path, plugin_manager, monkeypatch):
    hide(monkeypatch, "robustbench")
    (tmp_path / "val").mkdir()
    with pytest.raises(BadInput) as exc:
        dataset("imagenet", {"root": str(tmp_path), "n": 4})
    assert exc.value.problems == ["dataset 'imagenet' needs the robustbench extra for RobustBench's 5000-image "
                                  "ImageNet list: pip install -e '.[robustbench]'"]


def test_imagenet_missing_folder_is_named_without_needing_robustbench(tmp_path, plugin_manager, monkeypatch):
    hide(monkeypatch, "robustbench")
    monkeypatch.setenv("BENCHKIT_HOME", str(tmp_path))
    with pytest.raises(MissingAsset, match=rf"^missing folder {tmp_path / 'imagenet' / 'val'}: get it from the ILSVRC2012"):
        dataset("imagenet", {"n": 8})
    entry = registry.get("datasets").get("imagenet")
    (asset, path), = entry.assets(entry.validate({"n": 8}, "d"))
    assert path == tmp_path / "imagenet" / "val" and "ILSVRC2012_img_val.tar" in asset.source


@pytest.fixture
def robustbench_list():
    if importlib.util.find_spec("robustbench") is None:  # its files are read, never imported
        pytest.skip("the robustbench extra is not installed (pip install -e '.[robustbench]')")
    from benchkit_data.imagenet import _robustbench_dir

    base = _robustbench_dir() / "helper_files"
    lines = (base / "imagenet_test_image_ids.txt").read_text().split()
    return lines, json.loads((base / "imagenet_class_to_id_map.json").read_text())


def test_imagenet_list_and_labels_are_robustbench_s(robustbench_list, plugin_manager):
    from benchkit_data.imagenet import robustbench_list as ours, selected

    lines, class_map = robustbench_list
    items = ours()
    assert len(items) == 5000 and [r for r, _ in items] == lines
    assert items[0] == ("n09468604/ILSVRC2012_val_00015253.JPEG", class_map["n09468604"])
    assert class_map == {w: i for i, w in enumerate(sorted(class_map))}  # torchvision's sorted-folder order
    assert selected(3, None) == items[:3]
    picked = selected(16, 0)
    assert picked == [items[i] for i in np.sort(np.random.RandomState(0).permutation(5000)[:16])]


def test_imagenet_images_match_robustbench_preprocessing(tmp_path, robustbench_list, plugin_manager):
    pytest.importorskip("PIL")
    tv = pytest.importorskip("torchvision.transforms")
    from PIL import Image

    from benchkit_data.imagenet import selected

    picked = selected(4, 3)
    sizes = [(500, 375), (333, 500), (256, 256), (640, 427)]  # typical val sizes, one already at 256
    for (rel, _), (w, h), seed in zip(picked, sizes, range(4)):
        path = tmp_path / "val" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
    entry = registry.get("datasets").get("imagenet")
    assert entry.assets(entry.validate({"root": str(tmp_path), "n": 4, "subset_seed": 3}, "d"))[1:] == []
    ds = dataset("imagenet", {"root": str(tmp_path), "n": 4, "subset_seed": 3})
    x, y = ds.get(range(4))
    assert x.shape == (4, 3, 224, 224) and y.tolist() == [label for _, label in picked] and ds.num_classes == 1000
    # RobustBench's PREPROCESSINGS['Res256Crop224'] (= DiffPure's 'imval' ImageNet transform)
    reference = tv.Compose([tv.Resize(256), tv.CenterCrop(224), tv.ToTensor()])
    for i, (rel, _) in enumerate(picked):
        assert torch.equal(x[i], reference(Image.open(tmp_path / "val" / rel).convert("RGB")))


def test_imagenet_missing_images_are_listed(tmp_path, robustbench_list, plugin_manager):
    from benchkit_data.imagenet import selected

    (tmp_path / "val").mkdir()
    with pytest.raises(MissingAsset) as exc:
        dataset("imagenet", {"root": str(tmp_path), "n": 25, "subset_seed": 0})
    lines = exc.value.problems
    first = tmp_path / "val" / selected(25, 0)[0][0]
    assert lines[0].startswith(f"missing file {first}: get it from the ILSVRC2012 validation set")
    assert len(lines) == 21 and lines[-1] == "... and 5 more of the 25 selected images are missing"
    entry = registry.get("datasets").get("imagenet")
    listed = entry.assets(entry.validate({"root": str(tmp_path), "n": 25, "subset_seed": 0}, "d"))
    assert len(listed) == 26 and listed[1][1] == first  # the folder, then each absent image
