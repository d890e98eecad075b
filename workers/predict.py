"""Use a trained run: predict the classes of one image, measure it on a dataset.

Both read the run's best checkpoint (`model.pt`, loaded with weights_only=True),
rebuild the model from the spec stored in it, and prepare images exactly as the
validation split was prepared during training.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from workers.runs import DONE_STATES, check_run, plot_confusion, read_record, run_key, update_record
from workers.spec import parse_spec
from workers.store import NotFound, ObjectStore, retrying

# images are checked and normalised like downloaded ones before they are classified
PREDICT_MAX_SIDE = 500


@dataclass
class RunModel:
    run: str
    model: object
    classes: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    spec: object
    checkpoint: dict

    def transform(self):
        from workers.build import eval_transform

        return eval_transform(self.image_size, self.mean, self.std)


def load_run(store: ObjectStore, run: str) -> RunModel:
    from workers.build import build_model, load_state

    check_run(run)
    try:
        data = retrying(store.get_bytes, run_key(run, "model.pt"))
    except NotFound:
        rec = read_record(store, run)
        state = f" (status {rec.get('status')})" if rec else ""
        raise ValueError(f"run {run!r} has no model in {store.url}{state}; `atscale runs` lists the runs") from None
    import io

    import torch

    ck = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    spec = parse_spec(ck["spec"])
    model, _ = build_model(spec, len(ck["classes"]), load_weights=False)
    model.load_state_dict(load_state(data))
    model.eval()
    return RunModel(run, model, list(ck["classes"]), int(ck["image_size"]), list(ck["mean"]), list(ck["std"]), spec,
                    {k: v for k, v in ck.items() if k != "state_dict"})


def predict_bytes(rm: RunModel, body: bytes, top: int = 5) -> list[dict]:
    """Top classes of one image (any format the downloader accepts), most likely first."""
    import torch

    from workers.build import load_image
    from workers.images import normalise_image

    img = normalise_image(body, max_side=max(PREDICT_MAX_SIDE, rm.image_size * 2), min_side=8)
    x = rm.transform()(load_image(img.data, rm.image_size)).unsqueeze(0)
    with torch.inference_mode():
        probs = torch.softmax(rm.model(x).float(), dim=1)[0]
    values, idx = probs.topk(min(top, len(rm.classes)))
    return [{"class": rm.classes[i], "probability": round(float(v), 5)} for v, i in zip(values.tolist(), idx.tolist())]


def evaluate_run(store: ObjectStore, run: str, dataset: str | None = None, *, cache_dir: str | Path,
                 batch_size: int = 64, num_workers: int = 0) -> dict:
    """Measure a run on a dataset's validation split (the run's own dataset by default).
    Images whose label is not one of the run's classes are left out and counted. The
    result goes to runs/<run>/evaluations/<dataset>.json (+ confusion PNG) and the
    run's record becomes `evaluated`."""
    import torch

    from workers.build import build_criterion
    from workers.names import checked_slug
    from workers.train import ImageFiles, evaluate, read_split

    rec = read_record(store, run) or {}
    rm = load_run(store, run)
    dataset = checked_slug(dataset or rec.get("dataset") or rm.checkpoint.get("dataset"), "dataset")
    t0 = time.time()
    classes, _train, val_s, info = read_split(store, dataset, cache_dir, classes=rm.classes)
    if not val_s:
        raise ValueError(f"dataset {dataset!r} has no validation images of the run's classes ({', '.join(rm.classes)})")
    loader = torch.utils.data.DataLoader(ImageFiles(val_s, rm.transform(), rm.image_size), batch_size=batch_size,
                                         num_workers=num_workers, shuffle=False)
    criterion = build_criterion(rm.spec)
    ev = evaluate(rm.model, criterion, loader, torch.device("cpu"), classes)
    result = {"run": run, "dataset": dataset, "split": "val", "images": ev["n"], "accuracy": round(ev["accuracy"], 5),
              "loss": round(ev["loss"], 5), "per_class_accuracy": ev["per_class_accuracy"], "confusion": ev["confusion"],
              "classes": classes, "chance": 1 / len(classes), "left_out_images": info["unknown_label_images"],
              "left_out_labels": sorted(set(info["dataset_classes"]) - set(classes)),
              "device": "cpu", "seconds": round(time.time() - t0, 2), "at": time.time()}
    retrying(store.put_json, run_key(run, f"evaluations/{dataset}.json"), result)
    retrying(store.put_bytes, run_key(run, f"evaluations/{dataset}-confusion.png"),
             plot_confusion(classes, ev["confusion"], f"{run} on {dataset} (validation split)"), "image/png")
    evaluations = dict(rec.get("evaluations") or {})
    evaluations[dataset] = {"accuracy": result["accuracy"], "images": result["images"], "at": result["at"]}
    status = "evaluated" if rec.get("status") in DONE_STATES or rec.get("status") is None else None
    update_record(store, run, status, evaluations=evaluations)
    return result
