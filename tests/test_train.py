"""Training on a tiny generated dataset, on CPU: real epochs, held-out validation."""
import hashlib
import io

import pytest
from PIL import Image, ImageDraw

from workers.dataset import split_of
from workers.store import LocalStore
from workers.train import TrainSpec, run_name, train_run


def make_dataset(store, per_class=24):
    rows = []
    for label, colour, shape in (("red-circles", (220, 30, 30), "ellipse"), ("blue-bars", (30, 30, 220), "rectangle")):
        for i in range(per_class):
            im = Image.new("RGB", (80, 64), (240 - i, 240, 240))
            d = ImageDraw.Draw(im)
            x = 5 + (i * 7) % 30
            getattr(d, shape)([x, 10, x + 40, 50], fill=colour)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            data = buf.getvalue()
            sha = hashlib.sha256(data).hexdigest()
            key = f"datasets/t/images/{label}/{sha}.jpg"
            store.put_bytes(key, data)
            rows.append({"key": key, "label": label, "sha256": sha, "split": split_of(sha, 30)})
    store.put_jsonl("datasets/t/manifest.jsonl", rows)
    return rows


def test_train_run_writes_model_metrics_and_learns(tmp_path):
    store = LocalStore(tmp_path / "store")
    rows = make_dataset(store)
    spec = TrainSpec(model="resnet18", epochs=3, batch_size=8, image_size=32, num_workers=0, lr=0.003)
    run = run_name("t", spec)
    m = train_run(store, "t", run, spec, cache_dir=tmp_path / "cache")
    assert m["epochs"] == 3 and len(m["per_epoch"]) == 3 and len(m["train_loss"]) == 3
    assert m["val_images"] == sum(r["split"] == "val" for r in rows) > 0
    assert m["train_images"] + m["val_images"] == len(rows)
    assert m["val_accuracy"] >= 0.75  # two trivially separable classes
    assert store.get_json(f"runs/{run}/metrics.json")["val_accuracy"] == m["val_accuracy"]
    assert store.get_bytes(f"runs/{run}/curves.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert store.get_json(f"runs/{run}/record.json")["status"] == "trained"
    import torch

    ckpt = torch.load(io.BytesIO(store.get_bytes(f"runs/{run}/model.pt")), weights_only=True)
    assert ckpt["classes"] == ["blue-bars", "red-circles"] and ckpt["model"] == "resnet18"


def test_run_name_is_deterministic_per_spec():
    assert run_name("d", TrainSpec()) == run_name("d", TrainSpec())
    assert run_name("d", TrainSpec()) != run_name("d", TrainSpec(epochs=3))


@pytest.mark.parametrize("bad", [{"model": "__import__('os').system('id')"}, {"model": "eval"},
                                 {"epochs": 0}, {"optimizer_code": "x"}])
def test_spec_refuses_unknown_names_and_values(bad):
    with pytest.raises(ValueError):
        TrainSpec(**bad)
