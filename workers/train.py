"""Train a classifier on a finalized dataset, from a checked training spec.

Shaped like torchvision's references/classification/train.py: a model built from the
spec (`workers.build`), `train_one_epoch` over the whole training split, `evaluate`
on the held-out validation split every epoch, the best checkpoint kept, a full
checkpoint every epoch so that a run resumes where it stopped after a crash.

Data: the dataset's images are copied once from the object store into a local,
content-addressed cache; a DataLoader with worker processes, pinned memory and
prefetching decodes them (JPEG DCT-scaled to about twice the input size), so the
data path keeps the model busy. On CUDA: bf16 autocast, channels-last, cuDNN
autotuning. With `nproc_per_node > 1` the run is started under torchrun with
DistributedDataParallel (`workers.ddp`); everything here takes the rank into account.

Written to the store per run: model.pt (best weights + classes, spec, image size,
normalisation), model.pt2 (torch.export program) + export.json, metrics.json,
curves.png, confusion.png and record.json (status and timing; see `workers.runs`).

This module imports torch only inside functions: `TrainSpec` is imported by the
request validation of `collect_breeds`, which must stay cheap.
"""
from __future__ import annotations

import io
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from workers.dataset import manifest_key
from workers.runs import (DONE_STATES, mark_queued, plot_confusion, plot_curves, read_record, run_key,  # noqa: F401
                          update_record)
from workers.spec import IMAGENET_MEAN, IMAGENET_STD, SpecError, TrainSpec, load_spec, parse_spec  # noqa: F401
from workers.store import NotFound, ObjectStore, retrying

log = logging.getLogger(__name__)

MEAN, STD = IMAGENET_MEAN, IMAGENET_STD
CHECKPOINT = "checkpoint.pt"


def run_name(dataset: str, spec: TrainSpec | dict) -> str:
    """Deterministic: one dataset version + one spec = one run, however often triggered."""
    spec = parse_spec(spec)
    return f"{dataset}-{spec.model_label}-{spec.digest()}"


@dataclass(frozen=True)
class Dist:
    """Where this process stands in a distributed run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


# -- data -----------------------------------------------------------------------------------
def cache_images(store: ObjectStore, manifest: list[dict], cache_dir: Path, threads: int = 16) -> list[Path]:
    """Copy every image of the manifest into a local cache once (content-addressed)."""
    paths = [Path(cache_dir) / m["sha256"][:2] / f"{m['sha256']}.jpg" for m in manifest]

    def one(i: int) -> None:
        if not paths[i].exists():
            retrying(store.download_to, manifest[i]["key"], paths[i])

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(one, range(len(manifest))))
    return paths


def read_manifest(store: ObjectStore, dataset: str) -> list[dict]:
    try:
        return retrying(store.get_jsonl, manifest_key(dataset))
    except NotFound:
        raise ValueError(f"no dataset {dataset!r} in {store.url} (no {manifest_key(dataset)}); "
                         f"`atscale status` lists the datasets") from None


def read_split(store: ObjectStore, dataset: str, cache_dir: str | Path, *, classes: list[str] | None = None,
               dist: Dist = Dist()) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]], dict]:
    """(classes, train samples, val samples, info). Samples are (cached path, class index).
    With `classes` given (a trained model's), images of other labels are left out and counted."""
    manifest = read_manifest(store, dataset)
    own = sorted({m["label"] for m in manifest})
    classes = list(classes) if classes is not None else own
    index = {c: i for i, c in enumerate(classes)}
    kept = [m for m in manifest if m["label"] in index]
    cache = Path(cache_dir).expanduser() / "images"
    if dist.main:
        paths = cache_images(store, kept, cache)
    dist.barrier()  # rank 0 fills the cache; the others find it full
    if not dist.main:
        paths = cache_images(store, kept, cache)
    train_s = [(str(p), index[m["label"]]) for p, m in zip(paths, kept) if m["split"] == "train"]
    val_s = [(str(p), index[m["label"]]) for p, m in zip(paths, kept) if m["split"] == "val"]
    info = {"dataset_classes": own, "unknown_label_images": len(manifest) - len(kept)}
    return classes, train_s, val_s, info


class ImageFiles:
    """Map-style dataset over cached files (a plain class: torch is imported lazily)."""

    def __init__(self, samples: list[tuple[str, int]], transform, image_size: int):
        self.samples, self.transform, self.image_size = samples, transform, image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from workers.build import load_image

        path, target = self.samples[i]
        return self.transform(load_image(path, self.image_size)), target


class EpochSampler:
    """Indices for one epoch: a permutation (or weighted draws with replacement when
    `weights` are given), seeded by seed + epoch, the same on every rank; under DDP
    padded to a multiple of the world size and split by rank, so that every rank runs
    the same number of batches."""

    def __init__(self, n: int, *, seed: int, weights: list[float] | None = None, shuffle: bool = True,
                 rank: int = 0, world: int = 1):
        self.n, self.seed, self.weights, self.shuffle, self.rank, self.world = n, seed, weights, shuffle, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.world) if self.world > 1 else self.n

    def indices(self) -> list[int]:
        import torch

        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is not None:
            idx = torch.multinomial(torch.tensor(self.weights, dtype=torch.float64), self.n, replacement=True,
                                    generator=g).tolist()
        elif self.shuffle:
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        if self.world > 1:
            total = len(self) * self.world
            while len(idx) < total:
                idx += idx[: total - len(idx)]
            idx = idx[self.rank::self.world]
        return idx

    def __iter__(self):
        return iter(self.indices())


def class_weights(targets: list[int], n_classes: int) -> list[float]:
    """n / (k * count): 1.0 for every class when balanced; 0 for a class without training images."""
    counts = [0] * n_classes
    for t in targets:
        counts[t] += 1
    n = len(targets)
    return [round(n / (n_classes * c), 6) if c else 0.0 for c in counts]


def build_loaders(train_s, val_s, spec: TrainSpec, n_classes: int, use_cuda: bool, dist: Dist = Dist()):
    """(train loader, val loader, train sampler, info). The validation split is sharded
    by rank without padding (every image counted once)."""
    import torch

    from workers.build import default_workers, eval_transform, train_transform

    workers = default_workers(spec, dist.world)
    common = dict(batch_size=spec.batch_size, num_workers=workers, pin_memory=use_cuda,
                  persistent_workers=workers > 0)
    if workers > 0:
        common["prefetch_factor"] = 4
    weights = None
    if spec.balance == "sampler":
        cw = class_weights([t for _, t in train_s], n_classes)
        weights = [cw[t] for _, t in train_s]
    sampler = EpochSampler(len(train_s), seed=spec.seed, weights=weights, rank=dist.rank, world=dist.world)
    # a lone last sample would break BatchNorm in training mode: drop it, never more
    drop_last = len(sampler) % spec.batch_size == 1 and len(sampler) > spec.batch_size
    train = torch.utils.data.DataLoader(ImageFiles(train_s, train_transform(spec), spec.image_size), sampler=sampler,
                                        drop_last=drop_last, **common)
    val_shard = val_s[dist.rank::dist.world]
    val = torch.utils.data.DataLoader(
        ImageFiles(val_shard, eval_transform(spec.image_size, spec.normalize.mean, spec.normalize.std), spec.image_size),
        shuffle=False, **common)
    return train, val, sampler, {"num_workers": workers, "drop_last": drop_last}


# -- loop -------------------------------------------------------------------------------------
def _autocast(device, amp: bool):
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()


def _to(x, device, channels_last: bool):
    import torch

    if channels_last and x.dim() == 4:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device, non_blocking=True)


def train_one_epoch(model, criterion, optimizer, loader, device, n_classes: int, *, scheduler=None, amp: bool = False,
                    channels_last: bool = False, max_steps: int | None = None) -> dict:
    """One pass over `loader`. Sums stay on the device (no sync per step). `scheduler`:
    a per-batch scheduler (OneCycleLR), stepped after each optimizer step."""
    import torch

    model.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = torch.zeros(n_classes, device=device, dtype=torch.long)
    n = steps = 0
    t0 = time.perf_counter()
    for images, targets in loader:
        images, targets = _to(images, device, channels_last), targets.to(device, non_blocking=True)
        with _autocast(device, amp):
            out = model(images)
            loss = criterion(out, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        bs = targets.size(0)
        loss_sum += loss.detach().double() * bs
        correct += (out.detach().argmax(1) == targets).sum()
        seen += torch.bincount(targets, minlength=n_classes)
        n += bs
        steps += 1
        if max_steps and steps >= max_steps:
            break
    return {"loss_sum": loss_sum, "correct": correct, "n": n, "seen": seen, "steps": steps,
            "seconds": time.perf_counter() - t0}


def evaluate_sums(model, criterion, loader, device, n_classes: int, *, amp: bool = False,
                  channels_last: bool = False) -> dict:
    import torch

    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(n_classes * n_classes, device=device, dtype=torch.long)
    n = 0
    with torch.inference_mode():
        for images, targets in loader:
            images, targets = _to(images, device, channels_last), targets.to(device, non_blocking=True)
            with _autocast(device, amp):
                out = model(images)
                loss = criterion(out.float(), targets)
            loss_sum += loss.double() * targets.size(0)
            confusion += torch.bincount(targets * n_classes + out.argmax(1), minlength=n_classes * n_classes)
            n += targets.size(0)
    return {"loss_sum": loss_sum, "confusion": confusion.view(n_classes, n_classes), "n": n}


def summarize_eval(sums: dict, classes: list[str]) -> dict:
    conf = sums["confusion"].tolist()
    n = int(sums["n"])
    correct = sum(conf[i][i] for i in range(len(classes)))
    per_class = {c: (round(conf[i][i] / sum(conf[i]), 5) if sum(conf[i]) else None) for i, c in enumerate(classes)}
    return {"loss": float(sums["loss_sum"]) / max(n, 1), "accuracy": correct / max(n, 1), "n": n,
            "confusion": conf, "per_class_accuracy": per_class}


def evaluate(model, criterion, loader, device, classes: list[str], *, amp: bool = False,
             channels_last: bool = False) -> dict:
    """Loss, accuracy, per-class accuracy and confusion matrix (rows: true, columns: predicted)."""
    return summarize_eval(evaluate_sums(model, criterion, loader, device, len(classes), amp=amp,
                                        channels_last=channels_last), classes)


def _all_reduce(dist: Dist, *tensors):
    if dist.world > 1:
        import torch.distributed as tdist

        for t in tensors:
            tdist.all_reduce(t)


def _all_reduce_int(dist: Dist, value: int, device) -> int:
    if dist.world == 1:
        return value
    import torch

    t = torch.tensor([value], device=device, dtype=torch.long)
    _all_reduce(dist, t)
    return int(t.item())


# -- a run -------------------------------------------------------------------------------------
def _checkpoint_bytes(obj: dict) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _load_checkpoint(store: ObjectStore, key: str) -> dict | None:
    import torch

    try:
        data = retrying(store.get_bytes, key)
    except NotFound:
        return None
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}"[:2000] if text else type(exc).__name__


def _inside_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def train_run(store: ObjectStore, dataset: str, run: str, spec: TrainSpec | dict, *, cache_dir: str | Path,
              progress: Callable[[dict], None] | None = None, force: bool = False) -> dict:
    """Train `spec` on `dataset` as run `run` and return its metrics.

    Idempotent: a run already trained returns its stored metrics (unless `force`);
    a run with a checkpoint resumes after its last finished epoch (unless `force`).
    With `spec.nproc_per_node > 1` the training runs under torchrun (DDP)."""
    spec = parse_spec(spec)
    rec = read_record(store, run) or {}
    if rec.get("status") in DONE_STATES and not force:
        metrics = store.get_json_or(run_key(run, "metrics.json"))
        if metrics:
            log.info("run %s already %s; not training again", run, rec["status"])
            return metrics
    if spec.nproc_per_node > 1 and not _inside_torchrun():
        from workers.ddp import launch

        return launch(store, dataset, run, spec, cache_dir=cache_dir, force=force)
    return train_process(store, dataset, run, spec, cache_dir=cache_dir, progress=progress, force=force, dist=Dist())


def train_process(store: ObjectStore, dataset: str, run: str, spec: TrainSpec, *, cache_dir: str | Path,
                  progress: Callable[[dict], None] | None = None, force: bool = False, dist: Dist = Dist()) -> dict:
    """The training in this process (rank `dist.rank` of `dist.world`). Rank 0 writes the
    record, checkpoints and artifacts; a failure marks the run failed with its reason."""
    if dist.main:
        prev = read_record(store, run) or {}
        update_record(store, run, "training", dataset=dataset, spec=spec.model_dump(), epochs=spec.epochs,
                      epoch=prev.get("epoch", 0) if not force else 0, attempts=prev.get("attempts", 0) + 1,
                      world_size=dist.world, host=os.uname().nodename)
    try:
        return _train(store, dataset, run, spec, cache_dir=cache_dir, progress=progress, force=force, dist=dist)
    except BaseException as exc:
        if dist.main:
            try:
                update_record(store, run, "failed", reason=_reason(exc))
            except Exception:
                log.exception("could not mark run %s failed", run)
        raise


def _train(store, dataset, run, spec: TrainSpec, *, cache_dir, progress, force, dist: Dist) -> dict:
    import torch

    from workers import build

    t0 = time.time()
    classes, train_s, val_s, split_info = read_split(store, dataset, cache_dir, dist=dist)
    if len(classes) < 2:
        raise ValueError(f"dataset {dataset!r} has {len(classes)} {'class' if len(classes) == 1 else 'classes'} with images; need at least 2")
    if not train_s or not val_s:
        raise ValueError(f"dataset {dataset!r} needs images in both splits (train {len(train_s)}, val {len(val_s)})")
    k = len(classes)

    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", dist.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = bool(spec.amp and use_cuda and torch.cuda.is_bf16_supported())
    channels_last = bool(spec.channels_last and use_cuda)

    torch.manual_seed(spec.seed)
    model, pretrained = build.build_model(spec, k)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    targets = [t for _, t in train_s]
    weights = class_weights(targets, k)
    criterion = build.build_criterion(spec, weights if spec.balance == "loss_weights" else None).to(device)
    optimizer = build.build_optimizer(spec, model.parameters())
    train_loader, val_loader, sampler, loader_info = build_loaders(train_s, val_s, spec, k, use_cuda, dist)
    scheduler, per_batch, watches_val = build.build_scheduler(spec, optimizer, len(train_loader))

    counts = [targets.count(i) for i in range(k)]
    metrics = {"run": run, "dataset": dataset, "model": spec.model if isinstance(spec.model, str) else spec.model_label,
               "classes": classes, "device": str(device), "world_size": dist.world,
               "device_name": torch.cuda.get_device_name(device) if use_cuda else "cpu",
               "amp": "bf16" if amp else None, "channels_last": channels_last,
               "train_images": len(train_s), "val_images": len(val_s), "chance": 1 / k,
               "train_class_counts": dict(zip(classes, counts)), "balance": spec.balance,
               "class_weights": dict(zip(classes, weights)) if spec.balance != "none" else None,
               "num_workers": loader_info["num_workers"], "batch_size": spec.batch_size,
               "parameters": sum(p.numel() for p in model.parameters()), "pretrained": pretrained,
               "unknown_label_images": split_info["unknown_label_images"],
               "epochs": 0, "train_loss": [], "val_loss": [], "train_accuracy": [], "val_accuracy_per_epoch": [],
               "lr": [], "epoch_seconds": [], "epoch_train_seconds": [], "per_epoch": [], "resumed_from": []}
    start_epoch, best, best_loss, best_state = 0, -1.0, math.inf, None
    ck_key = run_key(run, CHECKPOINT)
    if force:
        if dist.main:
            for key in [ck_key] + store.list(f"runs/{run}/evaluations/"):
                store.delete(key)
    else:
        ck = _load_checkpoint(store, ck_key)
        if ck and ck.get("digest") == spec.digest() and ck.get("classes") == classes:
            model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            if scheduler is not None and ck.get("lr_scheduler") is not None:
                scheduler.load_state_dict(ck["lr_scheduler"])
            start_epoch, best, best_loss, fresh = ck["epoch"], ck["best"], ck.get("best_loss", math.inf), metrics
            metrics = ck["metrics"]
            for key in ("device", "device_name", "world_size", "amp", "channels_last", "num_workers"):
                metrics[key] = fresh[key]  # where this attempt runs (it may be another machine)
            metrics["resumed_from"].append(start_epoch)
            metrics["resumed_from_epoch"] = start_epoch
            if dist.main and best >= 0:
                best_state = build.load_state(retrying(store.get_bytes, run_key(run, "model.pt")))
            log.info("run %s: resuming after epoch %d of %d", run, start_epoch, spec.epochs)
        elif ck:
            log.warning("run %s: checkpoint is from another spec or class list; starting over", run)

    net = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[dist.local_rank] if use_cuda else None)

    for epoch in range(start_epoch, spec.epochs):
        te = time.time()
        sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        tr = train_one_epoch(net, criterion, optimizer, train_loader, device, k, scheduler=scheduler if per_batch else None,
                             amp=amp, channels_last=channels_last)
        if dist.world > 1:  # every rank validates with rank 0's BatchNorm statistics
            import torch.distributed as tdist

            for b in model.buffers():
                tdist.broadcast(b, 0)
        ev_sums = evaluate_sums(model, criterion, val_loader, device, k, amp=amp, channels_last=channels_last)
        _all_reduce(dist, tr["loss_sum"], tr["correct"], tr["seen"], ev_sums["loss_sum"], ev_sums["confusion"])
        tr_n = _all_reduce_int(dist, tr["n"], device)
        ev_sums["n"] = _all_reduce_int(dist, ev_sums["n"], device)
        ev = summarize_eval(ev_sums, classes)
        train_loss = float(tr["loss_sum"]) / max(tr_n, 1)
        train_acc = int(tr["correct"]) / max(tr_n, 1)
        if scheduler is not None and not per_batch:
            scheduler.step(ev["loss"]) if watches_val else scheduler.step()
        secs = time.time() - te
        metrics["epochs"] = epoch + 1
        metrics["train_loss"].append(round(train_loss, 5))
        metrics["val_loss"].append(round(ev["loss"], 5))
        metrics["train_accuracy"].append(round(train_acc, 5))
        metrics["val_accuracy_per_epoch"].append(round(ev["accuracy"], 5))
        metrics["lr"].append(lr)
        metrics["epoch_seconds"].append(round(secs, 2))
        metrics["epoch_train_seconds"].append(round(tr["seconds"], 2))
        metrics["per_epoch"].append({"epoch": epoch + 1, "train_loss": round(train_loss, 5),
                                     "val_loss": round(ev["loss"], 5), "val_accuracy": round(ev["accuracy"], 5),
                                     "train_accuracy": round(train_acc, 5), "lr": lr, "train_samples": tr_n,
                                     "val_samples": ev["n"], "seen_per_class": dict(zip(classes, tr["seen"].tolist()))})
        if (ev["accuracy"], -ev["loss"]) > (best, -best_loss):  # the best accuracy; on a tie, the lower loss
            best, best_loss = ev["accuracy"], ev["loss"]
            metrics.update(best_epoch=epoch + 1, confusion=ev["confusion"], per_class_accuracy=ev["per_class_accuracy"])
            if dist.main:
                best_state = {key: v.detach().to("cpu", copy=True) for key, v in model.state_dict().items()}
                retrying(store.put_bytes, run_key(run, "model.pt"), _checkpoint_bytes({
                    "state_dict": best_state, "classes": classes, "model": metrics["model"], "spec": spec.model_dump(),
                    "image_size": spec.image_size, "mean": list(spec.normalize.mean), "std": list(spec.normalize.std),
                    "epoch": epoch + 1, "val_accuracy": best, "run": run, "dataset": dataset}))
        if dist.main:
            retrying(store.put_bytes, ck_key, _checkpoint_bytes({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
                "epoch": epoch + 1, "best": best, "best_loss": best_loss, "metrics": metrics, "digest": spec.digest(),
                "classes": classes}))
            update_record(store, run, epoch=epoch + 1, epochs=spec.epochs, val_accuracy=round(best, 5))
            log.info("run %s epoch %d/%d: train loss %.4f, val loss %.4f, val acc %.3f (%.1fs)", run, epoch + 1,
                     spec.epochs, train_loss, ev["loss"], ev["accuracy"], secs)
            if progress:
                progress({"epoch": epoch + 1, "epochs": spec.epochs, "train_loss": train_loss,
                          "val_loss": ev["loss"], "val_accuracy": ev["accuracy"]})

    train_secs = sum(metrics["epoch_train_seconds"])
    metrics["final_val_accuracy"] = metrics["val_accuracy_per_epoch"][-1]
    metrics["val_accuracy"] = best  # of the kept (best) checkpoint
    metrics["train_images_per_second"] = round(sum(e["train_samples"] for e in metrics["per_epoch"]) / train_secs, 1) \
        if train_secs else None
    metrics["seconds"] = round(time.time() - t0, 1)
    if dist.main:
        _finish(store, run, spec, metrics, best_state, classes)
    dist.barrier()
    return metrics


def _finish(store, run, spec: TrainSpec, metrics: dict, best_state: dict, classes: list[str]) -> None:
    from workers import build
    from workers.export import EXPORT_FILE, export_meta, export_program

    try:
        model, _ = build.build_model(spec, len(classes), load_weights=False)
        model.load_state_dict(best_state)
        model.eval()
        meta = export_meta(classes, spec.image_size, run, round(spec.image_size * build.VAL_RESIZE))
        data = export_program(model, mean=spec.normalize.mean, std=spec.normalize.std, image_size=spec.image_size,
                              meta=meta)
        retrying(store.put_bytes, run_key(run, EXPORT_FILE), data)
        retrying(store.put_json, run_key(run, "export.json"), meta)
        metrics["export"] = {"file": EXPORT_FILE, "bytes": len(data)}
    except Exception as exc:  # the run is still good: say so in the metrics and the record
        log.exception("run %s: export failed", run)
        metrics["export"] = {"error": _reason(exc)}
    retrying(store.put_json, run_key(run, "metrics.json"), metrics)
    retrying(store.put_bytes, run_key(run, "curves.png"), plot_curves(metrics), "image/png")
    retrying(store.put_bytes, run_key(run, "confusion.png"),
             plot_confusion(classes, metrics["confusion"], f"{run}: validation, best epoch {metrics['best_epoch']}"),
             "image/png")
    store.delete(run_key(run, CHECKPOINT))
    artifacts = sorted(k.rsplit("/", 1)[1] for k in store.list(f"runs/{run}/") if k.count("/") == 2)
    rec = read_record(store, run) or {}
    seconds = round(time.time() - rec["started_at"], 1) if rec.get("started_at") else metrics["seconds"]
    update_record(store, run, "trained", val_accuracy=metrics["val_accuracy"], best_epoch=metrics["best_epoch"],
                  epoch=metrics["epochs"], epochs=spec.epochs, seconds=seconds, artifacts=artifacts,
                  wait_seconds=round(rec["started_at"] - rec["queued_at"], 1)
                  if rec.get("queued_at") and rec.get("started_at") and rec["queued_at"] <= rec["started_at"] else None)
