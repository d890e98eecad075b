"""Train a torchvision classifier on a finalized dataset.

Shaped like torchvision's references/classification/train.py: a model looked up by
name, `train_one_epoch` over the whole training split, `evaluate` on the held-out
validation split each epoch, the best checkpoint kept. Reads the dataset back from
the object store through a local cache; writes model, metrics, curves and a run
record to the store.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field

from workers.dataset import manifest_key
from workers.store import NotFound, ObjectStore, retrying

log = logging.getLogger(__name__)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
ALLOWED_MODELS = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large",
                  "efficientnet_b0", "convnext_tiny", "regnet_y_400mf", "shufflenet_v2_x1_0", "squeezenet1_1")


class TrainSpec(BaseModel):
    """What to train. Every name is checked against an allow-list; nothing is evaluated."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("resnet18", description="torchvision model name")
    epochs: int = Field(8, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=4096)
    lr: float = Field(0.002, gt=0, le=10)
    weight_decay: float = Field(0.0005, ge=0, le=1)
    image_size: int = Field(64, ge=16, le=1024)
    seed: int = 0
    num_workers: int = Field(2, ge=0, le=64)

    def model_post_init(self, _ctx) -> None:
        if self.model not in ALLOWED_MODELS:
            raise ValueError(f"unknown model {self.model!r}; allowed: {', '.join(ALLOWED_MODELS)}")

    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:8]


def run_name(dataset: str, spec: TrainSpec) -> str:
    """Deterministic: one dataset version + one spec = one run, however often triggered."""
    return f"{dataset}-{spec.model.replace('_', '-')}-{spec.digest()}"


def run_key(run: str, name: str) -> str:
    return f"runs/{run}/{name}"


# -- data -----------------------------------------------------------------------
def cache_images(store: ObjectStore, manifest: list[dict], cache_dir: Path, threads: int = 16) -> list[Path]:
    """Copy every image of the manifest into a local cache once (content-addressed)."""
    paths = [cache_dir / m["sha256"][:2] / f"{m['sha256']}.jpg" for m in manifest]

    def one(i: int) -> None:
        if not paths[i].exists():
            retrying(store.download_to, manifest[i]["key"], paths[i])

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(one, range(len(manifest))))
    return paths


def build_loaders(samples_train, samples_val, spec: TrainSpec, use_cuda: bool):
    import torch
    from PIL import Image
    from torchvision.transforms import v2

    train_tf = v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(spec.image_size, scale=(0.5, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])
    val_tf = v2.Compose([
        v2.ToImage(),
        v2.Resize(int(spec.image_size * 1.14), antialias=True),
        v2.CenterCrop(spec.image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])

    class Files(torch.utils.data.Dataset):
        def __init__(self, samples, tf):
            self.samples, self.tf = samples, tf

        def __len__(self):
            return len(self.samples)

        def __getitem__(self, i):
            path, target = self.samples[i]
            with Image.open(path) as im:
                im.draft("RGB", (spec.image_size * 2, spec.image_size * 2))
                return self.tf(im.convert("RGB")), target

    g = torch.Generator().manual_seed(spec.seed)
    common = dict(batch_size=spec.batch_size, num_workers=spec.num_workers, pin_memory=use_cuda,
                  persistent_workers=spec.num_workers > 0)
    if spec.num_workers > 0:
        common["prefetch_factor"] = 4
    train = torch.utils.data.DataLoader(Files(samples_train, train_tf), shuffle=True, drop_last=False,
                                        generator=g, **common)
    val = torch.utils.data.DataLoader(Files(samples_val, val_tf), shuffle=False, **common)
    return train, val


# -- loop -------------------------------------------------------------------------
def train_one_epoch(model, criterion, optimizer, loader, device) -> float:
    model.train()
    total, n = 0.0, 0
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        loss = criterion(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * images.size(0)
        n += images.size(0)
    return total / max(n, 1)


def evaluate(model, criterion, loader, device, n_classes: int) -> dict:
    import torch

    model.eval()
    total, correct, n = 0.0, 0, 0
    confusion = [[0] * n_classes for _ in range(n_classes)]
    with torch.inference_mode():
        for images, targets in loader:
            images, targets = images.to(device), targets.to(device)
            out = model(images)
            total += criterion(out, targets).item() * images.size(0)
            pred = out.argmax(1)
            correct += (pred == targets).sum().item()
            n += images.size(0)
            for t, p in zip(targets.tolist(), pred.tolist()):
                confusion[t][p] += 1
    return {"loss": total / max(n, 1), "accuracy": correct / max(n, 1), "n": n, "confusion": confusion}


def plot_curves(metrics: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = list(range(1, len(metrics["train_loss"]) + 1))
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, metrics["train_loss"], label="train loss")
    a.plot(ep, metrics["val_loss"], label="val loss")
    a.set_xlabel("epoch"); a.legend(); a.set_title("loss")
    b.plot(ep, metrics["val_accuracy_per_epoch"], label="val accuracy", color="tab:green")
    b.axhline(metrics["chance"], ls="--", color="grey", label="chance")
    b.set_ylim(0, 1); b.set_xlabel("epoch"); b.legend(); b.set_title("validation accuracy")
    fig.suptitle(metrics["run"])
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def train_run(store: ObjectStore, dataset: str, run: str, spec: TrainSpec, *, cache_dir: str | Path,
              progress: Callable[[dict], None] | None = None) -> dict:
    import torch
    import torchvision

    t0 = time.time()
    record = {"run": run, "dataset": dataset, "spec": spec.model_dump(), "status": "training", "started_at": t0}
    retrying(store.put_json, run_key(run, "record.json"), record)

    manifest = retrying(store.get_jsonl, manifest_key(dataset))
    classes = sorted({m["label"] for m in manifest})
    if len(classes) < 2:
        raise ValueError(f"dataset {dataset!r} has {len(classes)} class(es) with images; need at least 2")
    index = {c: i for i, c in enumerate(classes)}
    paths = cache_images(store, manifest, Path(cache_dir).expanduser() / "images")
    train_s = [(str(p), index[m["label"]]) for p, m in zip(paths, manifest) if m["split"] == "train"]
    val_s = [(str(p), index[m["label"]]) for p, m in zip(paths, manifest) if m["split"] == "val"]
    if not train_s or not val_s:
        raise ValueError(f"dataset {dataset!r} needs images in both splits (train {len(train_s)}, val {len(val_s)})")

    torch.manual_seed(spec.seed)
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    train_loader, val_loader = build_loaders(train_s, val_s, spec, use_cuda)
    model = torchvision.models.get_model(spec.model, weights=None, num_classes=len(classes)).to(device)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=spec.epochs)

    metrics = {"run": run, "dataset": dataset, "model": spec.model, "classes": classes, "device": str(device),
               "train_images": len(train_s), "val_images": len(val_s), "chance": 1 / len(classes),
               "epochs": 0, "train_loss": [], "val_loss": [], "val_accuracy_per_epoch": [], "epoch_seconds": [],
               "per_epoch": []}
    best = -1.0
    for epoch in range(spec.epochs):
        te = time.time()
        loss = train_one_epoch(model, criterion, optimizer, train_loader, device)
        scheduler.step()
        ev = evaluate(model, criterion, val_loader, device, len(classes))
        metrics["epochs"] = epoch + 1
        metrics["train_loss"].append(round(loss, 5))
        metrics["val_loss"].append(round(ev["loss"], 5))
        metrics["val_accuracy_per_epoch"].append(round(ev["accuracy"], 5))
        metrics["epoch_seconds"].append(round(time.time() - te, 2))
        metrics["per_epoch"].append({"epoch": epoch + 1, "train_loss": round(loss, 5), "val_loss": round(ev["loss"], 5),
                                     "val_accuracy": round(ev["accuracy"], 5)})
        if ev["accuracy"] > best:
            best = ev["accuracy"]
            metrics["best_epoch"] = epoch + 1
            metrics["confusion"] = ev["confusion"]
            buf = io.BytesIO()
            torch.save({"state_dict": model.state_dict(), "classes": classes, "model": spec.model,
                        "spec": spec.model_dump(), "image_size": spec.image_size, "mean": MEAN, "std": STD}, buf)
            retrying(store.put_bytes, run_key(run, "model.pt"), buf.getvalue())
        log.info("run %s epoch %d/%d: train loss %.4f, val loss %.4f, val acc %.3f", run, epoch + 1, spec.epochs,
                 loss, ev["loss"], ev["accuracy"])
        record.update(epoch=epoch + 1, epochs=spec.epochs, val_accuracy=round(ev["accuracy"], 5))
        retrying(store.put_json, run_key(run, "record.json"), record)
        if progress:
            progress({"epoch": epoch + 1, "epochs": spec.epochs, "train_loss": loss, "val_accuracy": ev["accuracy"]})
    metrics["final_val_accuracy"] = metrics["val_accuracy_per_epoch"][-1]
    metrics["val_accuracy"] = best  # of the kept (best) checkpoint
    metrics["seconds"] = round(time.time() - t0, 1)
    retrying(store.put_json, run_key(run, "metrics.json"), metrics)
    retrying(store.put_bytes, run_key(run, "curves.png"), plot_curves(metrics), "image/png")
    record.update(status="trained", finished_at=time.time(), val_accuracy=best, epochs=spec.epochs)
    retrying(store.put_json, run_key(run, "record.json"), record)
    return metrics
