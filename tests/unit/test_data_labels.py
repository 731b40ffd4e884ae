"""Labelled shards: a `video,label` list through the real writer and reader (class-index file, label resolution,
resume checks, repeated augmentation), and the label errors users meet."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipeline.config import AugmentConfig, DataConfig
from pipeline.data import build_loader, make_shards
from pipeline.data.encode import encode_h264
from pipeline.data.labels import derive_class_names, read_class_index, resolve_label, sample_label, write_class_index
from pipeline.data.manifest import iter_shard, read_manifest
from pipeline.data.urls import expand_shard_urls

CLASSES = ["jumping", "running", "swimming"]


def write_list(root, labels: list[str], header: str = "video,label") -> str:
    os.makedirs(root / "clips", exist_ok=True)
    rows = [header]
    for i, label in enumerate(labels):
        frames = np.random.default_rng(i).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
        (root / "clips" / f"v{i}.mp4").write_bytes(encode_h264(frames, fps=8.0))
        rows.append(f"clips/v{i}.mp4,{label}")
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    return str(root / "list.csv")


def test_labelled_list_to_shards_and_batches(tmp_path):
    write_class_index(str(tmp_path / "index.txt"), CLASSES)
    labels = ["running", "2", "jumping", "swimming", "running", "0", "1", "swimming"]  # names and indices mix
    out = str(tmp_path / "shards")
    manifest = make_shards(write_list(tmp_path, labels), out, shard_size=1, progress=False,
                           class_index=str(tmp_path / "index.txt"))
    assert manifest["num_samples"] == 8 and manifest["num_classes"] == 3
    assert read_class_index(os.path.join(out, "classes.txt")) == CLASSES
    metas = [json.loads(s["json"]) for url in expand_shard_urls(out) for s in iter_shard(url)]
    expected = [CLASSES.index(v) if not v.isdigit() else int(v) for v in labels]
    assert [m["label"] for m in metas] == expected
    assert [m["label_name"] for m in metas] == [CLASSES[i] for i in expected]
    assert all("caption" not in m for m in metas)  # a label list needs no captions

    cfg = DataConfig(eval_shards=out, num_frames=4, img_size=32, batch_size=4, num_workers=0, eval_crop="center")
    batches = list(build_loader(cfg, "eval", rank=0, world_size=1))
    assert [b["label"].tolist() for b in batches] == [expected[:4], expected[4:]]
    assert batches[0]["text"] == [CLASSES[i] for i in expected[:4]]  # the class name stands in for a caption
    assert batches[0]["video"].shape == (4, 3, 4, 32, 32)


def test_repeated_augmentation_gives_consecutive_copies(tmp_path):
    out = str(tmp_path / "shards")
    make_shards(write_list(tmp_path, ["a", "b", "c", "d"]), out, shard_size=2, progress=False)
    cfg = DataConfig(train_shards=out, num_frames=4, img_size=16, batch_size=4, num_workers=0, shuffle_buffer=1,
                     augment=AugmentConfig(rand_augment="rand-m9-n2", random_erasing=1.0, repeats=2))
    batch = next(iter(build_loader(cfg, "train", rank=0, world_size=1)))
    keys, label = batch["key"], batch["label"].tolist()
    assert keys[0] == keys[1] and keys[2] == keys[3] and keys[0] != keys[2]
    assert label[0] == label[1] and label[2] == label[3]
    assert not batch["video"][0].equal(batch["video"][1])  # two augmentations of one decoded clip


def test_derived_classes_and_label_errors(tmp_path):
    assert derive_class_names(["b", "a", "b"]) == ["a", "b"]
    assert derive_class_names(["2", 0, "1"]) == ["0", "1", "2"]
    with pytest.raises(ValueError, match="mixes integer labels and class names"):
        derive_class_names(["a", "1"])
    with pytest.raises(ValueError, match="row 3: label 'diving' is not in the class index"):
        resolve_label("diving", CLASSES, "row 3")
    with pytest.raises(ValueError, match="label 3 is outside the 3 classes"):
        resolve_label("3", CLASSES, "row 1")
    # a shard's json label (the reader skips and counts such samples): only a non-negative integer is a class index
    assert sample_label(json.loads('{"label": 2}')) == 2
    for bad in ("true", "-1", "1.5", '"2"', "1e400", "null", "[1]"):
        with pytest.raises(ValueError, match="json 'label' must be a class index"):
            sample_label(json.loads(f'{{"label": {bad}}}'))

    out = str(tmp_path / "shards")
    listing = write_list(tmp_path, ["swim", "run", "swim"])
    make_shards(listing, out, shard_size=2, progress=False)
    assert read_class_index(os.path.join(out, "classes.txt")) == ["run", "swim"]  # sorted names
    assert read_manifest(out)["num_classes"] == 2
    write_class_index(str(tmp_path / "other.txt"), ["swim", "run"])
    with pytest.raises(ValueError, match="different options"):  # another class order: not the same shard set
        make_shards(listing, out, shard_size=2, progress=False, class_index=str(tmp_path / "other.txt"))
    (tmp_path / "gap.csv").write_text("video,label\nclips/v0.mp4,run\nclips/v1.mp4,\n")
    with pytest.raises(ValueError, match="row 2: the list has a 'label' column, but this row has no label"):
        make_shards(str(tmp_path / "gap.csv"), str(tmp_path / "gap"), progress=False)
    captions = write_list(tmp_path / "captions", ["a dog runs"], header="video,caption")
    with pytest.raises(ValueError, match="no 'label' column"):
        make_shards(captions, str(tmp_path / "c"), progress=False, class_index=str(tmp_path / "other.txt"))
