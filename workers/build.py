"""Turn a checked `TrainSpec` into torch objects: model, optimizer, loss, scheduler,
transforms. Every class comes from a fixed table keyed by the allow-listed names of
`workers.spec`; a name that is not there raises (it cannot: the spec was checked).

A layers model is built one layer at a time while a zero image of the spec's size
runs through it, so that `"auto"` takes the real size of the previous layer's
output and a size that does not fit is reported with the layer's index and the
shapes, before any training starts.
"""
from __future__ import annotations

import io
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from workers.spec import (CRITERIA, LAYERS, OPTIMIZERS, PER_BATCH_SCHEDULERS, SCHEDULERS, TRANSFORMS, ALLOWED_MODELS,
                          TrainSpec)

# the draft size JPEG decoding may shrink to before the transforms (a multiple of the input size)
DRAFT_FACTOR = 2
VAL_RESIZE = 1.14  # shorter side resized to image_size * 1.14, then centre-cropped (like 256/224)
# a layers model larger than this is refused before anything is allocated
MAX_PARAMETERS = 1_000_000_000
MAX_ACTIVATIONS = 256_000_000  # values in one layer's output, per image


class BuildError(ValueError):
    """A spec that passed the schema but cannot be built (sizes that do not fit, a bad weights file)."""


def _table(module, names) -> dict[str, Any]:
    out = {}
    for n in names:
        obj = getattr(module, n, None)
        if obj is None:  # an allow-listed name this torch version lacks
            continue
        out[n] = obj
    return out


@lru_cache(maxsize=1)
def _classes():
    import torch
    from torchvision.transforms import v2

    return {
        "layers": _table(torch.nn, LAYERS),
        "optimizers": _table(torch.optim, OPTIMIZERS),
        "criteria": _table(torch.nn, CRITERIA),
        "schedulers": _table(torch.optim.lr_scheduler, SCHEDULERS),
        "transforms": _table(v2, TRANSFORMS),
    }


def _lookup(kind: str, name: str):
    table = _classes()[kind]
    if name not in table:
        raise BuildError(f"{name!r} is not available in this torch/torchvision version")
    return table[name]


def _tuples(params: dict, keep_lists: tuple[str, ...] = ()) -> dict:
    return {k: (tuple(v) if isinstance(v, list) and k not in keep_lists else v) for k, v in params.items()}


# -- model ----------------------------------------------------------------------------------
def _weights_of(name: str, p: dict) -> int:
    """Parameters a layer will allocate (the big ones; norms and activations are small)."""
    if name == "Linear":
        return p["in_features"] * p["out_features"]
    if name == "Conv2d":
        k = p["kernel_size"]
        kk = k[0] * k[-1] if isinstance(k, list) else k * k
        return p["in_channels"] * p["out_channels"] * kk // max(1, p.get("groups") or 1)
    return 0


def build_layers(layers: list[dict], n_classes: int, image_size: int):
    """Resolve "auto"/"n_labels" and check every size on the meta device (shapes only,
    nothing allocated), then build the layers for real."""
    import torch

    x = torch.zeros(1, 3, image_size, image_size, device="meta")
    resolved, total = [], 0
    with torch.no_grad():
        for i, spec in enumerate(layers):
            name = spec["name"]
            where = f"layer {i} ({name})"
            params = {k: v for k, v in spec.items() if k != "name"}
            shape = tuple(x.shape)
            for key, value in list(params.items()):
                actual = None
                if key in ("in_channels", "num_features", "num_channels"):
                    if x.dim() < 2:
                        raise BuildError(f"{where}: gets an input of shape {shape} without channels")
                    actual = x.shape[1]
                elif key == "in_features":
                    if x.dim() != 2:
                        raise BuildError(f"{where}: gets an input of shape {shape}; a Linear layer here needs a "
                                         f"2-d input: add {{\"name\": \"Flatten\"}} before it")
                    actual = x.shape[1]
                elif key == "normalized_shape":
                    actual = list(x.shape[1:])
                if value == "n_labels":
                    params[key] = n_classes
                elif value == "auto":
                    params[key] = actual
                elif actual is not None and value != actual and not (key == "normalized_shape" and [value] == actual):
                    raise BuildError(f"{where}: {key} is {value} but the previous layer gives {actual} "
                                     f"(input shape {shape}); write \"auto\"")
            total += _weights_of(name, params)
            if total > MAX_PARAMETERS:
                raise BuildError(f"{where}: the model would have more than {MAX_PARAMETERS:,} parameters "
                                 f"(input shape {shape}); make it smaller")
            kwargs = _tuples(params, keep_lists=("normalized_shape",))
            try:
                with torch.device("meta"):
                    layer = _lookup("layers", name)(**kwargs)
                layer.eval()
                x = layer(x)
            except BuildError:
                raise
            except Exception as exc:
                raise BuildError(f"{where}: does not fit an input of shape {shape}: {exc}") from None
            if x.numel() > MAX_ACTIVATIONS:
                raise BuildError(f"{where}: gives {x.numel():,} values per image (shape {tuple(x.shape)}); "
                                 f"at most {MAX_ACTIVATIONS:,}: make it smaller")
            resolved.append((name, kwargs))
    if tuple(x.shape) != (1, n_classes):
        raise BuildError(f"the model's output has shape {tuple(x.shape)} for one image; it must be (1, {n_classes}) "
                         f"(one score per class): end with a Linear layer with out_features \"n_labels\" "
                         f"(after a Flatten)")
    model = torch.nn.Sequential(*[_lookup("layers", name)(**kwargs) for name, kwargs in resolved])
    model.train()
    return model


def build_model(spec: TrainSpec, n_classes: int, *, load_weights: bool = True):
    """(model, pretrained_info). The model is in train mode, on the CPU."""
    import torch
    import torchvision

    if spec.is_layers:
        model = build_layers(spec.model, n_classes, spec.image_size)
    else:
        if spec.model not in ALLOWED_MODELS or spec.model not in torchvision.models.list_models(module=torchvision.models):
            raise BuildError(f"model {spec.model!r} is not available in torchvision {torchvision.__version__}")
        model = torchvision.models.get_model(spec.model, weights=None, num_classes=n_classes)
        try:
            model.eval()
            with torch.no_grad():
                out = model(torch.zeros(1, 3, spec.image_size, spec.image_size))
        except Exception as exc:
            raise BuildError(f"model {spec.model} does not run on {spec.image_size}x{spec.image_size} images: {exc}; "
                             f"use a larger image_size") from None
        if tuple(out.shape) != (1, n_classes):
            raise BuildError(f"model {spec.model} gives shape {tuple(out.shape)}, expected (1, {n_classes})")
        model.train()
    info = None
    if load_weights and spec.weights_path:
        info = load_pretrained(model, spec.weights_path)
    return model, info


def load_state(source) -> dict:
    """A state dict from a file or bytes, with torch.load(weights_only=True) only.
    Accepts a plain state dict, ours (`{"state_dict": ...}`) or torchvision's
    reference checkpoints (`{"model": ...}`)."""
    import pickle

    import torch

    f = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        obj = torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BuildError(f"not a plain weights file (refused by torch.load with weights_only=True): {first}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise BuildError("not a state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_pretrained(model, path: str) -> dict:
    """Load every tensor whose name and shape match (the classifier head usually does not)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise BuildError(f"weights_path {str(p)!r}: no such file on this worker")
    try:
        with open(p, "rb") as fh:
            state = load_state(fh)
    except BuildError as exc:
        raise BuildError(f"weights_path {str(p)!r}: {exc}") from None
    own = model.state_dict()
    ok = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not ok:
        raise BuildError(f"weights_path {str(p)!r}: none of its {len(state)} tensors matches the model's names and shapes")
    model.load_state_dict(ok, strict=False)
    skipped = sorted(set(own) - set(ok))
    return {"path": str(p), "loaded": len(ok), "skipped": skipped[:50], "n_skipped": len(skipped)}


# -- optimizer, loss, scheduler ------------------------------------------------------------------
def build_optimizer(spec: TrainSpec, params):
    kw = {k: v for k, v in spec.optimizer.items() if k != "name"}
    return _lookup("optimizers", spec.optimizer["name"])(params, **_tuples(kw))


def build_criterion(spec: TrainSpec, class_weights: list[float] | None = None):
    import torch

    kw = {k: v for k, v in spec.criterion.items() if k != "name"}
    if class_weights is not None:
        kw["weight"] = torch.tensor(class_weights, dtype=torch.float32)
    return _lookup("criteria", spec.criterion["name"])(**kw)


def build_scheduler(spec: TrainSpec, optimizer, steps_per_epoch: int):
    """(scheduler or None, per_batch: bool, watches_val_loss: bool)."""
    s = spec.lr_scheduler
    if not s:
        return None, False, False
    name = s["name"]
    kw = {k: v for k, v in s.items() if k != "name"}
    if kw.get("T_max") == "epochs":
        kw["T_max"] = spec.epochs
    if name == "OneCycleLR":
        if kw.get("max_lr") == "lr":
            kw["max_lr"] = optimizer.param_groups[0]["lr"]
        kw["total_steps"] = spec.epochs * max(1, steps_per_epoch)
    if name == "ReduceLROnPlateau":
        kw["mode"] = "min"
    sched = _lookup("schedulers", name)(optimizer, **_tuples(kw, keep_lists=("milestones",)))
    return sched, name in PER_BATCH_SCHEDULERS, name == "ReduceLROnPlateau"


# -- images and transforms -------------------------------------------------------------------------
def load_image(source, image_size: int):
    """An RGB PIL image from a path or bytes. JPEGs are decoded at a reduced scale
    (DCT scaling, `draft`) when they are much larger than needed: never below
    DRAFT_FACTOR x image_size on either side."""
    from PIL import Image

    f = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with Image.open(f) as im:
        if im.format == "JPEG":
            im.draft("RGB", (image_size * DRAFT_FACTOR, image_size * DRAFT_FACTOR))
        return im.convert("RGB")


class FitSize:
    """Resize the shorter side to `size` and centre-crop, unless the image already is size x size."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img):
        from torchvision.transforms.v2 import functional as F

        if tuple(img.shape[-2:]) != (self.size, self.size):
            img = F.resize(img, [self.size], antialias=True)
            img = F.center_crop(img, [self.size, self.size])
        return img

    def __repr__(self):
        return f"FitSize({self.size})"


def _transform(entry: dict, image_size: int):
    from torchvision.transforms import v2

    name = entry["name"]
    kw = {k: v for k, v in entry.items() if k != "name"}
    for k, v in list(kw.items()):
        if v == "image_size":
            kw[k] = image_size
        elif k == "interpolation":
            kw[k] = v2.InterpolationMode(v)
        elif k == "policy":
            kw[k] = v2.AutoAugmentPolicy(v)
    if name == "Grayscale":
        kw["num_output_channels"] = 3
    return _lookup("transforms", name)(**_tuples(kw))


def train_transform(spec: TrainSpec):
    import torch
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), *[_transform(t, spec.image_size) for t in spec.transform],
                       FitSize(spec.image_size), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(spec.normalize.mean, spec.normalize.std)])


def eval_transform(image_size: int, mean, std):
    import torch
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.Resize(round(image_size * VAL_RESIZE), antialias=True), v2.CenterCrop(image_size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def check_buildable(spec: TrainSpec, n_classes: int, *, with_weights: bool = False) -> dict:
    """Build everything once on the CPU (model, optimizer, loss, scheduler, transforms on
    a test image) so that a spec that cannot train is refused before it is queued."""
    import torch
    from PIL import Image

    model, info = build_model(spec, n_classes, load_weights=with_weights)
    opt = build_optimizer(spec, model.parameters())
    build_criterion(spec, [1.0] * n_classes if spec.balance == "loss_weights" else None)
    build_scheduler(spec, opt, 1)
    try:
        out = train_transform(spec)(Image.new("RGB", (spec.image_size * 2, spec.image_size * 2 - 3), (90, 120, 200)))
    except Exception as exc:
        raise BuildError(f"transform: fails on a test image: {exc}") from None
    if tuple(out.shape) != (3, spec.image_size, spec.image_size) or out.dtype != torch.float32:
        raise BuildError(f"transform: gives {tuple(out.shape)} {out.dtype}, expected (3, {spec.image_size}, "
                         f"{spec.image_size}) float32")
    n_params = sum(p.numel() for p in model.parameters())
    return {"parameters": n_params, "pretrained": info}


def default_workers(spec: TrainSpec, world_size: int = 1) -> int:
    if spec.num_workers != "auto":
        return int(spec.num_workers)
    return max(1, min(8, (os.cpu_count() or 1) // max(1, world_size)))
