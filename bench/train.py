"""Training data-path benchmark: atscale's path vs a plain ImageFolder loop, same model,
same steps, same images, same transforms, one run.

    .venv/bin/python bench/train.py                 # resnet18 at 64 px, 2 x 60 steps of 32 per path (about 4 minutes on 2 cores)
    .venv/bin/python bench/train.py --steps 200 --image-size 128 --workers 8    # on a GPU machine

What it does:

1. Generates a dataset of photo-like JPEGs (noise, gradients and shapes; 300-500 px,
   quality 90, like the images the pipeline stores), writes it once into a local
   object store as a finalized dataset (images + manifest) and once as a
   torchvision ImageFolder tree of the same files.
2. Trains the same model (same seed, same initial weights, same optimizer and
   transforms) for the same number of steps twice:
   * ours: the store -> local cache copy (a cold cache: the copy is timed), the
     dataset's training split, `build_loaders` (worker processes, pinned memory on
     CUDA, prefetch, JPEG draft decoding), and `train_one_epoch`;
   * plain: `torchvision.datasets.ImageFolder` + `DataLoader(shuffle=True,
     num_workers, pin_memory)` and a plain forward/backward/step loop.
   Both include their loader start-up; the GPU (if any) is warmed up first. The two
   paths alternate for --rounds rounds (plain first, then ours first, ...) and each
   is reported at its best round.
3. Iterates each loader alone (no model) to show how much faster than the model
   the data path is.
4. Prints images/s for each, the ratio ours / plain (target: at least 0.95), and
   with --json writes the figures to a file.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COLOURS = [(200, 40, 40), (40, 40, 200), (40, 160, 60), (220, 180, 30), (150, 60, 180), (30, 170, 170),
           (230, 110, 20), (90, 90, 90), (240, 120, 170), (120, 80, 30)]


def photo(rng: np.random.Generator, cls: int) -> bytes:
    """A photo-like JPEG: a gradient background, noise and a class-coloured shape."""
    w, h = int(rng.integers(300, 501)), int(rng.integers(300, 501))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * rng.uniform(60, 200), yy / h * rng.uniform(60, 200),
                     np.full((h, w), rng.uniform(40, 200))], axis=-1)
    base += rng.normal(0, 18, size=(h, w, 3))
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    colour = COLOURS[cls % len(COLOURS)]
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w * 2 // 3)), int(rng.integers(0, h * 2 // 3))
        x1, y1 = x0 + int(rng.integers(w // 5, w // 3)), y0 + int(rng.integers(h // 5, h // 3))
        (d.ellipse if cls % 2 else d.rectangle)([x0, y0, x1, y1], fill=colour)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def build_data(work: Path, classes: int, per_class: int, seed: int):
    from workers.dataset import split_of
    from workers.store import LocalStore

    store = LocalStore(work / "store")
    folder = work / "imagefolder"
    rng = np.random.default_rng(seed)
    rows, total_bytes = [], 0
    for c in range(classes):
        label = f"class-{c}"
        (folder / label).mkdir(parents=True, exist_ok=True)
        for _ in range(per_class):
            data = photo(rng, c)
            sha = hashlib.sha256(data).hexdigest()
            key = f"datasets/bench/images/{label}/{sha}.jpg"
            split = split_of(sha, 10)
            store.put_bytes(key, data)
            rows.append({"key": key, "label": label, "sha256": sha, "split": split})
            if split == "train":  # the plain loop trains on exactly the same images
                (folder / label / f"{sha}.jpg").write_bytes(data)
            total_bytes += len(data)
    store.put_jsonl("datasets/bench/manifest.jsonl", rows)
    return store, folder, rows, total_bytes


def make_model(spec, n_classes, device):
    import torch

    from workers.build import build_criterion, build_model, build_optimizer

    torch.manual_seed(spec.seed)
    model, _ = build_model(spec, n_classes)
    model.to(device)
    if device.type == "cuda" and spec.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, build_criterion(spec).to(device), build_optimizer(spec, model.parameters())


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_ours(store, spec, n_classes, device, steps: int, cache: Path) -> dict:
    from workers.train import build_loaders, read_split, train_one_epoch

    amp = device.type == "cuda" and spec.amp
    cl = device.type == "cuda" and spec.channels_last
    model, criterion, optimizer = make_model(spec, n_classes, device)
    sync(device)
    t0 = time.perf_counter()
    classes, train_s, val_s, _ = read_split(store, "bench", cache)  # cold cache: copies from the store
    t_cache = time.perf_counter() - t0
    loader, _val, sampler, _info = build_loaders(train_s, val_s, spec, n_classes, device.type == "cuda")
    done = images = epoch = 0
    while done < steps:
        sampler.set_epoch(epoch)
        r = train_one_epoch(model, criterion, optimizer, loader, device, n_classes, amp=amp, channels_last=cl,
                            max_steps=steps - done)
        done += r["steps"]
        images += r["n"]
        epoch += 1
    sync(device)
    wall = time.perf_counter() - t0
    return {"images": images, "steps": done, "seconds": round(wall, 2), "cache_seconds": round(t_cache, 2),
            "images_per_s": round(images / wall, 1), "train_images": len(train_s)}


def run_plain(folder, spec, n_classes, device, steps: int) -> dict:
    import torch
    import torchvision

    from workers.build import train_transform, default_workers

    amp = device.type == "cuda" and spec.amp
    cl = device.type == "cuda" and spec.channels_last
    model, criterion, optimizer = make_model(spec, n_classes, device)
    sync(device)
    t0 = time.perf_counter()
    ds = torchvision.datasets.ImageFolder(str(folder), transform=train_transform(spec))
    workers = default_workers(spec)
    loader = torch.utils.data.DataLoader(ds, batch_size=spec.batch_size, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    done = images = 0
    model.train()
    while done < steps:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            images += y.size(0)
            if done >= steps:
                break
    sync(device)
    wall = time.perf_counter() - t0
    return {"images": images, "steps": done, "seconds": round(wall, 2), "images_per_s": round(images / wall, 1),
            "train_images": len(ds)}


def loader_only(loader, batches: int) -> float:
    t0 = time.perf_counter()
    n = 0
    while True:
        for x, _y in loader:
            n += x.size(0)
            batches -= 1
            if batches <= 0:
                return round(n / (time.perf_counter() - t0), 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", help="a torchvision model of the allow-list (default resnet18)")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--per-class", type=int, default=80, help="images per class (default 80)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per path (default 60)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--workers", default="auto", help="DataLoader workers for both paths (default: auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of both paths; best of each (default 2)")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--keep", action="store_true", help="keep the generated data (printed path)")
    args = p.parse_args(argv)

    import torch

    from workers.build import train_transform
    from workers.spec import parse_spec
    from workers.train import ImageFiles

    spec = parse_spec({"model": args.model, "batch_size": args.batch_size, "image_size": args.image_size,
                       "seed": args.seed, "num_workers": args.workers if args.workers == "auto" else int(args.workers),
                       "epochs": 1})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp(prefix="atscale-bench-train-"))
    try:
        t = time.perf_counter()
        store, folder, rows, total = build_data(work, args.classes, args.per_class, args.seed)
        n_train = sum(r["split"] == "train" for r in rows)
        print(f"data: {len(rows)} JPEGs ({total / len(rows) / 1024:.0f} KB average), {n_train} in the training split, "
              f"{args.classes} classes; generated in {time.perf_counter() - t:.1f}s")
        print(f"model: {args.model} at {args.image_size} px, batch {args.batch_size}, {args.steps} steps, device "
              f"{device}{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, "
              f"torch threads {torch.get_num_threads()}")
        # warm-up: allocator, cuDNN autotuning, first-call overheads (not timed)
        model, criterion, optimizer = make_model(spec, args.classes, device)
        for _ in range(3):
            x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
            y = torch.randint(0, args.classes, (args.batch_size,), device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        del model, optimizer

        # the two paths alternate, first one then the other first (whichever runs second in a round
        # tends to run slower); each figure is the best of its rounds, the least disturbed by anything
        # else on the machine; every round of ours starts from a cold cache
        plains, ourss = [], []
        for r in range(args.rounds):
            order = ("plain", "ours") if r % 2 == 0 else ("ours", "plain")
            for which in order:
                if which == "plain":
                    plains.append(run_plain(folder, spec, args.classes, device, args.steps))
                else:
                    ourss.append(run_ours(store, spec, args.classes, device, args.steps, work / f"cache-{r}"))
            print(f"round {r + 1}: plain {plains[-1]['images_per_s']:.1f} images/s, ours {ourss[-1]['images_per_s']:.1f}"
                  f" images/s")
        plain = max(plains, key=lambda x: x["images_per_s"])
        ours = max(ourss, key=lambda x: x["images_per_s"])
        ratio = ours["images_per_s"] / plain["images_per_s"]

        # the data paths alone, warm, no model
        from workers.build import default_workers

        w = default_workers(spec)
        plain_loader = torch.utils.data.DataLoader(
            __import__("torchvision").datasets.ImageFolder(str(folder), transform=train_transform(spec)),
            batch_size=args.batch_size, shuffle=True, num_workers=w)
        from workers.train import read_split

        _c, train_s, _v, _i = read_split(store, "bench", work / "cache")
        our_loader = torch.utils.data.DataLoader(ImageFiles(train_s, train_transform(spec), spec.image_size),
                                                 batch_size=args.batch_size, shuffle=True, num_workers=w)
        batches = max(10, args.steps // 2)
        data_plain, data_ours = loader_only(plain_loader, batches), loader_only(our_loader, batches)

        print()
        print(f"{'path':<44}{'images/s':>10}{'seconds':>10}")
        print(f"{'plain ImageFolder + DataLoader loop':<44}{plain['images_per_s']:>10.1f}{plain['seconds']:>10.1f}")
        print(f"{'ours: store -> cache -> loader (cold cache)':<44}{ours['images_per_s']:>10.1f}{ours['seconds']:>10.1f}"
              f"   (cache copy {ours['cache_seconds']:.1f}s included)")
        print(f"ratio ours / plain: {ratio:.2f}  (target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})")
        print(f"data path alone, {w} workers, no model: plain {data_plain:.0f} images/s, ours {data_ours:.0f} images/s "
              f"({data_ours / max(ours['images_per_s'], 1e-9):.1f}x what the training consumed)")
        figures = {"device": str(device), "model": args.model, "image_size": args.image_size,
                   "batch_size": args.batch_size, "steps": args.steps, "workers": w, "plain": plain, "ours": ours,
                   "rounds": {"plain": [x["images_per_s"] for x in plains], "ours": [x["images_per_s"] for x in ourss]},
                   "ratio": round(ratio, 3), "loader_only": {"plain": data_plain, "ours": data_ours},
                   "threads": torch.get_num_threads()}
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
        return 0
    finally:
        if args.keep:
            print(f"data kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
