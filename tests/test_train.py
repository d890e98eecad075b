"""Training on tiny generated datasets, on CPU, end to end: real epochs, held-out
validation, artifacts and records in a real local store, resume after a crash,
class imbalance, pretrained weights, and the export loaded without atscale's code."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw

from workers.dataset import split_of
from workers.store import LocalStore
from workers.train import TrainSpec, run_name, train_run

SHAPES = {"red-circles": ((220, 30, 30), "ellipse"), "blue-bars": ((30, 30, 220), "rectangle"),
          "green-boxes": ((30, 170, 40), "rectangle")}

# a small CNN in the spec's layers form: trains in well under a second per epoch at 32 px
TINY = [
    {"name": "Conv2d", "out_channels": 8, "kernel_size": 3, "padding": 1},
    {"name": "BatchNorm2d"},
    {"name": "ReLU"},
    {"name": "MaxPool2d", "kernel_size": 2},
    {"name": "Conv2d", "out_channels": 16, "kernel_size": 3, "padding": 1},
    {"name": "ReLU"},
    {"name": "AdaptiveAvgPool2d", "output_size": 4},
    {"name": "Flatten"},
    {"name": "Linear", "out_features": "n_labels"},
]
TINY_SPEC = {"model": TINY, "epochs": 3, "batch_size": 8, "image_size": 32, "num_workers": 0,
             "optimizer": {"name": "SGD", "lr": 0.05, "momentum": 0.9}}


def draw(label: str, i: int) -> bytes:
    colour, shape = SHAPES[label]
    im = Image.new("RGB", (80, 64), (240 - i, 240, 240 - (i * 3) % 40))
    d = ImageDraw.Draw(im)
    x = 5 + (i * 7) % 30
    getattr(d, shape)([x, 10, x + (40 if label != "blue-bars" else 16), 50], fill=colour)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_dataset(store, dataset: str = "t", per_class: dict | None = None, val_percent: int = 30) -> list[dict]:
    rows = []
    for label, n in (per_class or {"red-circles": 24, "blue-bars": 24}).items():
        for i in range(n):
            data = draw(label, i)
            sha = hashlib.sha256(data).hexdigest()
            key = f"datasets/{dataset}/images/{label}/{sha}.jpg"
            store.put_bytes(key, data)
            rows.append({"key": key, "label": label, "sha256": sha, "split": split_of(sha, val_percent)})
    store.put_jsonl(f"datasets/{dataset}/manifest.jsonl", rows)
    return rows


PNG = b"\x89PNG\r\n\x1a\n"


def test_torchvision_model_trains_end_to_end(tmp_path):
    import torch

    store = LocalStore(tmp_path / "store")
    rows = make_dataset(store)
    spec = TrainSpec(model="resnet18", epochs=3, batch_size=8, image_size=32, num_workers=0, lr=0.001)
    run = run_name("t", spec)
    m = train_run(store, "t", run, spec, cache_dir=tmp_path / "cache")
    n_val = sum(r["split"] == "val" for r in rows)
    assert m["epochs"] == 3 and len(m["per_epoch"]) == 3 and len(m["train_loss"]) == 3 and len(m["val_loss"]) == 3
    assert m["val_images"] == n_val > 0 and m["train_images"] + m["val_images"] == len(rows)
    for e in m["per_epoch"]:  # real epochs: every training image once (a lone last one may be dropped)
        assert e["train_samples"] in (m["train_images"], m["train_images"] - 1)
        assert sum(e["seen_per_class"].values()) == e["train_samples"] and e["val_samples"] == n_val
    assert m["val_accuracy"] >= 0.75 and m["val_accuracy"] == pytest.approx(max(m["val_accuracy_per_epoch"]), abs=1e-5)
    assert m["val_accuracy_per_epoch"][m["best_epoch"] - 1] == pytest.approx(m["val_accuracy"], abs=1e-5)
    assert sum(map(sum, m["confusion"])) == n_val and set(m["per_class_accuracy"]) == {"blue-bars", "red-circles"}
    assert m["device"] == "cpu" and m["amp"] is None and m["model"] == "resnet18" and m["chance"] == 0.5
    assert store.get_json(f"runs/{run}/metrics.json")["val_accuracy"] == m["val_accuracy"]
    assert store.get_bytes(f"runs/{run}/curves.png")[:8] == PNG
    assert store.get_bytes(f"runs/{run}/confusion.png")[:8] == PNG
    assert not store.exists(f"runs/{run}/checkpoint.pt")  # only kept while training
    rec = store.get_json(f"runs/{run}/record.json")
    assert rec["status"] == "trained" and rec["dataset"] == "t" and rec["attempts"] == 1
    assert rec["spec"] == spec.model_dump() and rec["val_accuracy"] == m["val_accuracy"]
    assert rec["started_at"] <= rec["finished_at"] and rec["seconds"] >= 0
    assert [h["status"] for h in rec["history"]] == ["training", "trained"]
    assert {"model.pt", "model.pt2", "export.json", "metrics.json", "curves.png", "confusion.png"} <= set(rec["artifacts"])
    ckpt = torch.load(io.BytesIO(store.get_bytes(f"runs/{run}/model.pt")), weights_only=True)
    assert ckpt["classes"] == ["blue-bars", "red-circles"] and ckpt["model"] == "resnet18"
    assert ckpt["image_size"] == 32 and ckpt["mean"] == [0.485, 0.456, 0.406] and ckpt["epoch"] == m["best_epoch"]
    assert TrainSpec(**ckpt["spec"]) == spec

    # one dataset version + one spec = one run: asked again, it is not trained again
    again = train_run(store, "t", run, spec, cache_dir=tmp_path / "cache")
    assert again == m
    assert len(store.get_json(f"runs/{run}/record.json")["history"]) == 2


class Crash(Exception):
    pass


def test_layers_spec_resumes_after_a_crash(tmp_path):
    import torch

    store = LocalStore(tmp_path / "store")
    make_dataset(store)
    spec = TrainSpec(**{**TINY_SPEC, "epochs": 4})
    run = run_name("t", spec)

    def crash_after_two(p):
        if p["epoch"] == 2:
            raise Crash("worker lost after epoch 2")

    with pytest.raises(Crash):
        train_run(store, "t", run, spec, cache_dir=tmp_path / "cache", progress=crash_after_two)
    rec = store.get_json(f"runs/{run}/record.json")
    assert rec["status"] == "failed" and rec["reason"] == "Crash: worker lost after epoch 2" and rec["epoch"] == 2
    assert not store.exists(f"runs/{run}/metrics.json")
    ck = torch.load(io.BytesIO(store.get_bytes(f"runs/{run}/checkpoint.pt")), weights_only=True)
    assert ck["epoch"] == 2 and len(ck["metrics"]["per_epoch"]) == 2
    first_two = ck["metrics"]["per_epoch"]

    seen = []
    m = train_run(store, "t", run, spec, cache_dir=tmp_path / "cache", progress=lambda p: seen.append(p["epoch"]))
    assert seen == [3, 4]  # only the epochs that were missing
    assert m["resumed_from_epoch"] == 2 and m["resumed_from"] == [2]
    assert m["epochs"] == 4 and len(m["per_epoch"]) == 4 and m["per_epoch"][:2] == first_two
    assert [e["epoch"] for e in m["per_epoch"]] == [1, 2, 3, 4]
    assert m["val_accuracy"] >= 0.75
    rec = store.get_json(f"runs/{run}/record.json")
    assert rec["status"] == "trained" and rec["attempts"] == 2 and "reason" not in rec
    assert [h["status"] for h in rec["history"]] == ["training", "failed", "training", "trained"]
    assert not store.exists(f"runs/{run}/checkpoint.pt")


def test_checkpoint_of_another_spec_is_not_resumed(tmp_path):
    store = LocalStore(tmp_path / "store")
    make_dataset(store)
    spec = TrainSpec(**{**TINY_SPEC, "epochs": 2})
    run = run_name("t", spec)
    def crash(p):
        raise Crash("stop")

    with pytest.raises(Crash):
        train_run(store, "t", run, spec, cache_dir=tmp_path / "cache", progress=crash)
    assert store.exists(f"runs/{run}/checkpoint.pt")
    other = TrainSpec(**{**TINY_SPEC, "epochs": 2, "seed": 7})  # trained under the same run name by hand
    m = train_run(store, "t", run, other, cache_dir=tmp_path / "cache")
    assert "resumed_from_epoch" not in m and len(m["per_epoch"]) == 2


def test_class_imbalance_weighted_sampler_and_loss_weights(tmp_path):
    store = LocalStore(tmp_path / "store")
    make_dataset(store, per_class={"red-circles": 40, "blue-bars": 10})
    base = {**TINY_SPEC, "epochs": 1}

    plain = train_run(store, "t", "t-plain", TrainSpec(**base), cache_dir=tmp_path / "cache")
    counts = plain["train_class_counts"]
    assert counts["red-circles"] > 3 * counts["blue-bars"] > 0
    assert plain["per_epoch"][0]["seen_per_class"] == counts and plain["class_weights"] is None

    n = sum(counts.values())
    expected = {c: round(n / (2 * k), 6) for c, k in counts.items()}
    sampled = train_run(store, "t", "t-sampler", TrainSpec(**base, balance="sampler"), cache_dir=tmp_path / "cache")
    assert sampled["class_weights"] == expected
    seen = sampled["per_epoch"][0]["seen_per_class"]
    assert sum(seen.values()) == n  # as many draws as images
    assert seen["blue-bars"] / n >= 0.3 > counts["blue-bars"] / n  # the minority class is drawn far more often

    weighted = train_run(store, "t", "t-weights", TrainSpec(**base, balance="loss_weights"), cache_dir=tmp_path / "cache")
    assert weighted["class_weights"] == expected
    assert weighted["per_epoch"][0]["seen_per_class"] == counts  # the sampler is untouched; the loss is weighted
    assert expected["blue-bars"] > 1 > expected["red-circles"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny trained run shared by the tests below."""
    tmp = tmp_path_factory.mktemp("trained")
    store = LocalStore(tmp / "store")
    make_dataset(store)
    spec = TrainSpec(**TINY_SPEC)
    run = run_name("t", spec)
    metrics = train_run(store, "t", run, spec, cache_dir=tmp / "cache")
    return {"store": store, "run": run, "spec": spec, "metrics": metrics, "tmp": tmp}


def test_local_pretrained_weights_are_loaded(trained, tmp_path):
    store = trained["store"]
    weights = tmp_path / "weights.pt"
    weights.write_bytes(store.get_bytes(f"runs/{trained['run']}/model.pt"))  # an atscale model.pt
    spec = TrainSpec(**{**TINY_SPEC, "epochs": 1, "optimizer": {"name": "SGD", "lr": 1e-6},
                        "weights_path": str(weights)})
    m = train_run(store, "t", run_name("t", spec), spec, cache_dir=trained["tmp"] / "cache")
    assert m["pretrained"]["loaded"] == 11 and m["pretrained"]["n_skipped"] == 0  # every tensor of TINY
    # with a learning rate of 1e-6 the first epoch starts where the trained run ended
    assert m["val_accuracy_per_epoch"][0] >= trained["metrics"]["val_accuracy"] - 0.1 >= 0.65


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_hostile_weights_file_is_refused_and_the_run_fails_with_the_reason(trained, tmp_path):
    import torch

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil(marker)}, evil)  # a checkpoint that runs a command when unpickled
    spec = TrainSpec(**{**TINY_SPEC, "epochs": 1, "weights_path": str(evil)})
    run = run_name("t", spec)
    from workers.build import BuildError

    with pytest.raises(BuildError, match="weights_only=True"):
        train_run(trained["store"], "t", run, spec, cache_dir=trained["tmp"] / "cache")
    assert not marker.exists()
    rec = trained["store"].get_json(f"runs/{run}/record.json")
    assert rec["status"] == "failed" and "refused by torch.load with weights_only=True" in rec["reason"]


LOAD_EXPORT = r'''
import json, sys
import torch

extra = {"atscale.json": ""}
program = torch.export.load(sys.argv[1], extra_files=extra)
meta = json.loads(extra["atscale.json"])
batch = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    scores = program.module()(batch)
print(json.dumps({"classes": meta["classes"], "image_size": meta["image_size"], "scores": scores.tolist(),
                  "project_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("workers", "tasks"))}))
'''


def test_export_loads_without_the_project_and_gives_the_same_scores(trained, tmp_path):
    import torch
    from torchvision.transforms import v2

    from workers.build import VAL_RESIZE, load_image
    from workers.predict import load_run

    store, run = trained["store"], trained["run"]
    (tmp_path / "model.pt2").write_bytes(store.get_bytes(f"runs/{run}/model.pt2"))
    meta = store.get_json(f"runs/{run}/export.json")
    assert meta["classes"] == ["blue-bars", "red-circles"] and meta["image_size"] == 32
    assert meta["resize"] == round(32 * VAL_RESIZE)
    # a batch prepared as the export's metadata says: resize, centre-crop, float in [0, 1], no normalisation
    prep = v2.Compose([v2.ToImage(), v2.Resize(meta["resize"]), v2.CenterCrop(32), v2.ToDtype(torch.float32, scale=True)])
    images = [load_image(draw(label, i), 32) for label in ("red-circles", "blue-bars") for i in (3, 11, 17)]
    batch = torch.stack([prep(im) for im in images])
    torch.save(batch, tmp_path / "batch.pt")
    out = subprocess.run([sys.executable, "-I", "-c", LOAD_EXPORT, "model.pt2", "batch.pt"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["project_modules"] == [] and res["classes"] == meta["classes"] and res["image_size"] == 32

    rm = load_run(store, run)  # the model as atscale runs it: normalisation in the transform
    mean, std = torch.tensor(rm.mean).view(1, 3, 1, 1), torch.tensor(rm.std).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = rm.model((batch - mean) / std)
    theirs = torch.tensor(res["scores"])
    assert theirs.shape == (6, 2)
    assert torch.allclose(theirs, ours, atol=1e-4)
    assert theirs.argmax(1).tolist() == ours.argmax(1).tolist() == [1, 1, 1, 0, 0, 0]  # red, red, red, blue, ...
