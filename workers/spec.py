"""The training spec: a JSON document validated against allow-lists.

Everything a user can name (a torchvision model, a `torch.nn` layer, an optimizer,
a loss, a learning-rate scheduler, a torchvision transform) is looked up in the
static tables below, and so is every parameter of it, with the type of value it
takes. Nothing is ever evaluated, imported or looked up by a user-given string:
a name that is not in a table is refused here, before any module is imported or
any file is touched. This module imports neither torch nor torchvision, so the
search workers and the CLI can check a spec cheaply; `workers.build` turns a
checked spec into torch objects on the training worker.

Compatible in spirit with the original project's training commands: `model` may be
a torchvision model name or a list of layers `{"name": "Conv2d", ...}` where
`"auto"` sizes an input from the previous layer and `"n_labels"` is the number of
classes; `optimizer` and `criterion` are `{"name": ..., params}`; `transform` may be
a list of `{"name": ..., params}` or the original `{"Name": params}` dictionary.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision classification models one may name (also checked against
# torchvision.models.list_models() when the model is built).
ALLOWED_MODELS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "wide_resnet50_2",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_v2_s",
    "convnext_tiny", "convnext_small",
    "regnet_x_400mf", "regnet_y_400mf", "regnet_y_800mf", "regnet_y_1_6gf",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "squeezenet1_0", "squeezenet1_1",
    "densenet121", "mnasnet0_5", "mnasnet1_0", "vgg11_bn", "alexnet",
)


class SpecError(ValueError):
    """An invalid training spec; the message has one line per problem."""


# -- parameter types ------------------------------------------------------------------
def _show(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (str, int, float, bool, list, dict, type(None))) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Kind:
    """A type of parameter value: `check(v)` returns the value (lists for tuples) or
    raises ValueError saying what it must be."""

    doc: str
    check: Callable[[Any], Any]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def INT(lo: int | None = None, hi: int | None = None, tokens: tuple[str, ...] = ()) -> Kind:
    rng = f" in [{lo}, {hi}]" if lo is not None and hi is not None else (f" >= {lo}" if lo is not None else "")
    doc = f"an integer{rng}" + "".join(f" or {t!r}" for t in tokens)

    def check(v):
        if isinstance(v, str) and v in tokens:
            return v
        if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError(doc)
        return v
    return Kind(doc, check)


def FLOAT(lo: float | None = None, hi: float | None = None, tokens: tuple[str, ...] = (), open_lo: bool = False) -> Kind:
    lo_s = "(" if open_lo else "["
    rng = f" in {lo_s}{lo}, {hi}]" if lo is not None and hi is not None else (
        f" {'>' if open_lo else '>='} {lo}" if lo is not None else "")
    doc = f"a number{rng}" + "".join(f" or {t!r}" for t in tokens)

    def check(v):
        if isinstance(v, str) and v in tokens:
            return v
        if not _is_num(v) or (lo is not None and (v <= lo if open_lo else v < lo)) or (hi is not None and v > hi):
            raise ValueError(doc)
        return v
    return Kind(doc, check)


def _check_bool(v):
    if not isinstance(v, bool):
        raise ValueError("true or false")
    return v


BOOL = Kind("true or false", _check_bool)


def CHOICE(*values) -> Kind:
    doc = "one of " + ", ".join(json.dumps(x) for x in values)

    def check(v):
        # exact type match: true is not 1, 1.0 is not 1
        if not any(type(v) is type(x) and v == x for x in values):
            raise ValueError(doc)
        return v
    return Kind(doc, check)


def SEQ(item: Kind, lengths: tuple[int, ...], scalar: bool = True) -> Kind:
    """`item`, or a list of `lengths` items (a scalar is allowed when `scalar`)."""
    n = " or ".join(str(x) for x in lengths)
    doc = (f"{item.doc}, or " if scalar else "") + f"a list of {n} of: {item.doc}"

    def check(v):
        if isinstance(v, (list, tuple)):
            if len(v) not in lengths:
                raise ValueError(doc)
            try:
                return [item.check(x) for x in v]
            except ValueError:
                raise ValueError(doc) from None
        if not scalar:
            raise ValueError(doc)
        try:
            return item.check(v)
        except ValueError:
            raise ValueError(doc) from None
    return Kind(doc, check)


def ANY_OF(*kinds: Kind) -> Kind:
    doc = " or ".join(k.doc for k in kinds)

    def check(v):
        for k in kinds:
            try:
                return k.check(v)
            except ValueError:
                continue
        raise ValueError(doc)
    return Kind(doc, check)


def LIST_OF(item: Kind, min_len: int = 1, max_len: int = 64) -> Kind:
    doc = f"a list of {min_len}-{max_len} of: {item.doc}"

    def check(v):
        if not isinstance(v, (list, tuple)) or not (min_len <= len(v) <= max_len):
            raise ValueError(doc)
        try:
            return [item.check(x) for x in v]
        except ValueError:
            raise ValueError(doc) from None
    return Kind(doc, check)


@dataclass(frozen=True)
class Param:
    kind: Kind
    required: bool = False
    default: Any = None  # filled in when omitted (a token such as "auto"), None: torch's default


def P(kind: Kind, required: bool = False, default: Any = None) -> Param:
    return Param(kind, required, default)


POS = INT(1, 1_000_000)
NONNEG = INT(0, 1_000_000)
PROB = FLOAT(0, 1)
POS_F = FLOAT(0, 1e6, open_lo=True)
NONNEG_F = FLOAT(0, 1e6)
INT2 = SEQ(INT(1, 4096), (1, 2))
INT2_0 = SEQ(INT(0, 4096), (1, 2))
AUTO_INT = INT(1, 10_000_000, tokens=("auto",))
OUT_INT = INT(1, 10_000_000, tokens=("n_labels",))
INTERP = CHOICE("nearest", "bilinear", "bicubic")
SIZE = ANY_OF(INT(1, 4096, tokens=("image_size",)), SEQ(INT(1, 4096), (2,), scalar=False))
PAIR = SEQ(FLOAT(-1e6, 1e6), (2,), scalar=False)
NUM_OR_PAIR = SEQ(FLOAT(0, 1e6), (2,))
FILL = ANY_OF(INT(0, 255), SEQ(INT(0, 255), (3,), scalar=False))
INPLACE = P(BOOL)

# -- torch.nn layers, with their parameters -----------------------------------------------
LAYERS: dict[str, dict[str, Param]] = {
    "Conv2d": {"in_channels": P(AUTO_INT, default="auto"), "out_channels": P(OUT_INT, required=True),
               "kernel_size": P(INT2, required=True), "stride": P(INT2), "padding": P(ANY_OF(INT2_0, CHOICE("same", "valid"))),
               "dilation": P(INT2), "groups": P(POS), "bias": P(BOOL),
               "padding_mode": P(CHOICE("zeros", "reflect", "replicate", "circular"))},
    "BatchNorm2d": {"num_features": P(AUTO_INT, default="auto"), "eps": P(POS_F), "momentum": P(PROB), "affine": P(BOOL),
                    "track_running_stats": P(BOOL)},
    "BatchNorm1d": {"num_features": P(AUTO_INT, default="auto"), "eps": P(POS_F), "momentum": P(PROB), "affine": P(BOOL),
                    "track_running_stats": P(BOOL)},
    "InstanceNorm2d": {"num_features": P(AUTO_INT, default="auto"), "eps": P(POS_F), "momentum": P(PROB),
                       "affine": P(BOOL), "track_running_stats": P(BOOL)},
    "GroupNorm": {"num_groups": P(POS, required=True), "num_channels": P(AUTO_INT, default="auto"), "eps": P(POS_F),
                  "affine": P(BOOL)},
    "LayerNorm": {"normalized_shape": P(ANY_OF(AUTO_INT, LIST_OF(POS, 1, 3)), default="auto"), "eps": P(POS_F),
                  "elementwise_affine": P(BOOL), "bias": P(BOOL)},
    "ReLU": {"inplace": INPLACE},
    "ReLU6": {"inplace": INPLACE},
    "LeakyReLU": {"negative_slope": P(NONNEG_F), "inplace": INPLACE},
    "ELU": {"alpha": P(NONNEG_F), "inplace": INPLACE},
    "PReLU": {"num_parameters": P(POS), "init": P(FLOAT(-10, 10))},
    "GELU": {"approximate": P(CHOICE("none", "tanh"))},
    "SiLU": {"inplace": INPLACE},
    "Hardswish": {"inplace": INPLACE},
    "Mish": {"inplace": INPLACE},
    "Tanh": {},
    "Sigmoid": {},
    "Softmax": {"dim": P(INT(-4, 3))},
    "LogSoftmax": {"dim": P(INT(-4, 3))},
    "MaxPool2d": {"kernel_size": P(INT2, required=True), "stride": P(INT2), "padding": P(INT2_0), "dilation": P(INT2),
                  "ceil_mode": P(BOOL)},
    "AvgPool2d": {"kernel_size": P(INT2, required=True), "stride": P(INT2), "padding": P(INT2_0), "ceil_mode": P(BOOL),
                  "count_include_pad": P(BOOL)},
    "AdaptiveAvgPool2d": {"output_size": P(INT2, required=True)},
    "AdaptiveMaxPool2d": {"output_size": P(INT2, required=True)},
    "Dropout": {"p": P(PROB), "inplace": INPLACE},
    "Dropout2d": {"p": P(PROB), "inplace": INPLACE},
    "Flatten": {"start_dim": P(INT(0, 3)), "end_dim": P(INT(-1, 3))},
    "Linear": {"in_features": P(AUTO_INT, default="auto"), "out_features": P(OUT_INT, required=True), "bias": P(BOOL)},
    "Identity": {},
}

_LR = P(FLOAT(0, 10, open_lo=True))
_BETAS = P(SEQ(FLOAT(0, 1), (2,), scalar=False))
_WD = P(FLOAT(0, 10))
_EPS = P(FLOAT(0, 1, open_lo=True))
OPTIMIZERS: dict[str, dict[str, Param]] = {
    "SGD": {"lr": _LR, "momentum": P(FLOAT(0, 1)), "dampening": P(FLOAT(0, 1)), "weight_decay": _WD,
            "nesterov": P(BOOL)},
    "Adam": {"lr": _LR, "betas": _BETAS, "eps": _EPS, "weight_decay": _WD, "amsgrad": P(BOOL)},
    "AdamW": {"lr": _LR, "betas": _BETAS, "eps": _EPS, "weight_decay": _WD, "amsgrad": P(BOOL)},
    "NAdam": {"lr": _LR, "betas": _BETAS, "eps": _EPS, "weight_decay": _WD, "momentum_decay": P(FLOAT(0, 1))},
    "RAdam": {"lr": _LR, "betas": _BETAS, "eps": _EPS, "weight_decay": _WD},
    "Adamax": {"lr": _LR, "betas": _BETAS, "eps": _EPS, "weight_decay": _WD},
    "RMSprop": {"lr": _LR, "alpha": P(FLOAT(0, 1)), "eps": _EPS, "weight_decay": _WD, "momentum": P(FLOAT(0, 1)),
                "centered": P(BOOL)},
    "Adagrad": {"lr": _LR, "lr_decay": P(FLOAT(0, 1)), "weight_decay": _WD, "eps": _EPS,
                "initial_accumulator_value": P(FLOAT(0, 1e3))},
    "Adadelta": {"lr": _LR, "rho": P(FLOAT(0, 1)), "eps": _EPS, "weight_decay": _WD},
}

# `weight` is never a parameter here: class weights come from `balance: "loss_weights"`.
CRITERIA: dict[str, dict[str, Param]] = {
    "CrossEntropyLoss": {"label_smoothing": P(FLOAT(0, 1))},
    "NLLLoss": {},
    "MultiMarginLoss": {"p": P(CHOICE(1, 2)), "margin": P(FLOAT(0, 100))},
}

# stepped once per epoch, except OneCycleLR (once per batch); ReduceLROnPlateau watches the validation loss
SCHEDULERS: dict[str, dict[str, Param]] = {
    "CosineAnnealingLR": {"T_max": P(INT(1, 100_000, tokens=("epochs",)), default="epochs"), "eta_min": P(NONNEG_F)},
    "StepLR": {"step_size": P(POS, required=True), "gamma": P(FLOAT(0, 1, open_lo=True))},
    "MultiStepLR": {"milestones": P(LIST_OF(POS, 1, 100), required=True), "gamma": P(FLOAT(0, 1, open_lo=True))},
    "ExponentialLR": {"gamma": P(FLOAT(0, 1, open_lo=True), required=True)},
    "LinearLR": {"start_factor": P(FLOAT(0, 1, open_lo=True)), "end_factor": P(FLOAT(0, 1)), "total_iters": P(POS)},
    "ReduceLROnPlateau": {"factor": P(FLOAT(0, 1, open_lo=True)), "patience": P(NONNEG), "threshold": P(NONNEG_F),
                          "cooldown": P(NONNEG), "min_lr": P(NONNEG_F)},
    "OneCycleLR": {"max_lr": P(FLOAT(0, 10, tokens=("lr",), open_lo=True), default="lr"),
                   "pct_start": P(FLOAT(0, 1, open_lo=True)), "anneal_strategy": P(CHOICE("cos", "linear")),
                   "div_factor": P(POS_F), "final_div_factor": P(POS_F), "three_phase": P(BOOL)},
}
PER_BATCH_SCHEDULERS = ("OneCycleLR",)

# torchvision.transforms.v2, applied to uint8 image tensors before conversion to float
TRANSFORMS: dict[str, dict[str, Param]] = {
    "RandomResizedCrop": {"size": P(SIZE, default="image_size"), "scale": P(SEQ(FLOAT(0, 1, open_lo=True), (2,), False)),
                          "ratio": P(SEQ(FLOAT(0, 100, open_lo=True), (2,), False)), "interpolation": P(INTERP),
                          "antialias": P(BOOL)},
    "RandomCrop": {"size": P(SIZE, default="image_size"), "padding": P(SEQ(INT(0, 1024), (1, 2, 4))),
                   "pad_if_needed": P(BOOL), "fill": P(FILL),
                   "padding_mode": P(CHOICE("constant", "edge", "reflect", "symmetric"))},
    "CenterCrop": {"size": P(SIZE, default="image_size")},
    "Resize": {"size": P(SIZE, default="image_size"), "interpolation": P(INTERP), "max_size": P(INT(1, 8192)),
               "antialias": P(BOOL)},
    "Pad": {"padding": P(SEQ(INT(0, 1024), (1, 2, 4)), required=True), "fill": P(FILL),
            "padding_mode": P(CHOICE("constant", "edge", "reflect", "symmetric"))},
    "RandomHorizontalFlip": {"p": P(PROB)},
    "RandomVerticalFlip": {"p": P(PROB)},
    "RandomRotation": {"degrees": P(ANY_OF(FLOAT(0, 360), PAIR), required=True), "interpolation": P(INTERP),
                       "expand": P(BOOL), "fill": P(FILL)},
    "RandomAffine": {"degrees": P(ANY_OF(FLOAT(0, 360), PAIR), required=True),
                     "translate": P(SEQ(FLOAT(0, 1), (2,), False)), "scale": P(SEQ(FLOAT(0, 100, open_lo=True), (2,), False)),
                     "shear": P(ANY_OF(FLOAT(0, 360), SEQ(FLOAT(-360, 360), (2, 4), False))), "interpolation": P(INTERP),
                     "fill": P(FILL)},
    "RandomPerspective": {"distortion_scale": P(PROB), "p": P(PROB), "interpolation": P(INTERP), "fill": P(FILL)},
    "ColorJitter": {"brightness": P(NUM_OR_PAIR), "contrast": P(NUM_OR_PAIR), "saturation": P(NUM_OR_PAIR),
                    "hue": P(ANY_OF(FLOAT(0, 0.5), SEQ(FLOAT(-0.5, 0.5), (2,), False)))},
    "RandomGrayscale": {"p": P(PROB)},
    "Grayscale": {},  # always 3 output channels
    "GaussianBlur": {"kernel_size": P(SEQ(INT(1, 255), (1, 2)), required=True), "sigma": P(NUM_OR_PAIR)},
    "RandomAutocontrast": {"p": P(PROB)},
    "RandomEqualize": {"p": P(PROB)},
    "RandomInvert": {"p": P(PROB)},
    "RandomPosterize": {"bits": P(INT(1, 8), required=True), "p": P(PROB)},
    "RandomSolarize": {"threshold": P(FLOAT(0, 255), required=True), "p": P(PROB)},
    "RandomAdjustSharpness": {"sharpness_factor": P(FLOAT(0, 100), required=True), "p": P(PROB)},
    "TrivialAugmentWide": {"num_magnitude_bins": P(INT(2, 1000)), "interpolation": P(INTERP)},
    "RandAugment": {"num_ops": P(INT(0, 20)), "magnitude": P(INT(0, 1000)), "num_magnitude_bins": P(INT(2, 1000)),
                    "interpolation": P(INTERP)},
    "AutoAugment": {"policy": P(CHOICE("imagenet", "cifar10", "svhn")), "interpolation": P(INTERP)},
    "AugMix": {"severity": P(INT(1, 10)), "mixture_width": P(INT(1, 10)), "chain_depth": P(INT(-1, 10)),
               "alpha": P(POS_F), "all_ops": P(BOOL)},
    "RandomErasing": {"p": P(PROB), "scale": P(SEQ(FLOAT(0, 1), (2,), False)),
                      "ratio": P(SEQ(FLOAT(0, 100, open_lo=True), (2,), False)), "value": P(FLOAT(0, 255))},
}
# accepted for compatibility with the original spec: conversion to a float tensor is always done
IMPLICIT_TRANSFORMS = ("ToTensor", "ToImage", "PILToTensor", "ToDtype", "ConvertImageDtype")

DEFAULT_OPTIMIZER = {"name": "AdamW", "lr": 0.002, "weight_decay": 0.0005}
DEFAULT_CRITERION = {"name": "CrossEntropyLoss"}
DEFAULT_SCHEDULER = {"name": "CosineAnnealingLR", "T_max": "epochs"}
DEFAULT_TRANSFORM = [{"name": "RandomResizedCrop", "size": "image_size", "scale": [0.5, 1.0]},
                     {"name": "RandomHorizontalFlip"}]

# keys of the original project's training commands that have no place in a spec here
_ORIGINAL_HINTS = {
    "n_labels": "the number of classes comes from the dataset; write \"n_labels\" as a layer's out_features",
    "label_names": "the classes are the dataset's (its queries)",
    "model_name": "runs are named from the dataset and the spec (see `atscale runs`)",
    "image_ops": "images are already normalised RGB JPEGs; use `image_size` and `transform`",
    "target_transform": "targets are class indices; nothing to set",
    "optimizer_code": "code is never accepted; name an optimizer from the allow-list",
}


# -- checking named things -----------------------------------------------------------------
def _allowed(names) -> str:
    return ", ".join(names)


def check_named(entry: Any, table: dict[str, dict[str, Param]], what: str, where: str = "") -> dict:
    """`{"name": N, **params}` (or a bare name) -> normalised dict, checked against `table`.
    `where` prefixes messages ("layer 3"); the field name is added by the caller."""
    at = f"{where}: " if where else ""
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict):
        raise ValueError(f"{at}must be a {what} name or an object {{\"name\": ..., parameters}}, got {_show(entry)}")
    name = entry.get("name")
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"{at}unknown {what} {_show(name)}; allowed: {_allowed(table)}")
    params = table[name]
    label = f"{where} ({name})" if where else name
    out: dict[str, Any] = {"name": name}
    for key, value in entry.items():
        if key == "name":
            continue
        if key not in params:
            raise ValueError(f"{label}: unknown parameter {_show(key)}; allowed: {_allowed(params) or 'none'}")
        try:
            out[key] = params[key].kind.check(value)
        except ValueError as exc:
            raise ValueError(f"{label}: {key} must be {exc}, got {_show(value)}") from None
    for key, p in params.items():
        if key not in out:
            if p.required:
                raise ValueError(f"{label}: {key} is required ({p.kind.doc})")
            if p.default is not None:
                out[key] = p.default
    return out


def check_model(v: Any) -> str | list[dict]:
    if isinstance(v, dict) and set(v) <= {"name", "layers"}:  # the original {"name": "", "layers": [...]}
        v = v.get("layers") or v.get("name")
    if isinstance(v, str):
        if v not in ALLOWED_MODELS:
            raise ValueError(f"unknown model {_show(v)}; allowed torchvision models: {_allowed(ALLOWED_MODELS)}; "
                             f"or a list of layers")
        return v
    if isinstance(v, (list, tuple)):
        if not 1 <= len(v) <= 256:
            raise ValueError(f"a layers model has 1-256 layers, got {len(v)}")
        return [check_named(layer, LAYERS, "layer", f"layer {i}") for i, layer in enumerate(v)]
    raise ValueError(f"must be a torchvision model name ({_allowed(ALLOWED_MODELS)}) or a list of layers "
                     f"{{\"name\": \"Conv2d\", ...}}, got {_show(v)}")


def check_transform(v: Any) -> tuple[list[dict], dict | None]:
    """Returns (transforms, normalize) where `normalize` comes from a `Normalize` entry, if any."""
    if v is None:
        return [], None
    if isinstance(v, dict):  # the original {"ToTensor": true, "Normalize": {...}} form
        items = []
        for name, params in v.items():
            if params is False or params is None:
                continue
            if params is True:
                params = {}
            if not isinstance(params, dict):
                raise ValueError(f"transform {_show(name)}: parameters must be an object or true, got {_show(params)}")
            items.append({"name": name, **params})
        v = items
    if not isinstance(v, (list, tuple)) or len(v) > 64:
        raise ValueError(f"must be a list of transforms {{\"name\": ..., parameters}} (at most 64), got {_show(v)}")
    out, normalize = [], None
    for i, t in enumerate(v):
        name = t.get("name") if isinstance(t, dict) else t
        if name in IMPLICIT_TRANSFORMS:
            continue
        if name == "Normalize":
            params = {k: x for k, x in (t.items() if isinstance(t, dict) else ()) if k != "name"}
            unknown = set(params) - {"mean", "std", "inplace"}
            if unknown:
                raise ValueError(f"transform {i} (Normalize): unknown parameter {_show(sorted(unknown)[0])}; "
                                 f"allowed: mean, std")
            normalize = {k: params[k] for k in ("mean", "std") if k in params}
            continue
        out.append(check_named(t, TRANSFORMS, "transform", f"transform {i}"))
    return out, normalize


class Normalize(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mean: list[float] = Field(default_factory=lambda: list(IMAGENET_MEAN), min_length=3, max_length=3)
    std: list[float] = Field(default_factory=lambda: list(IMAGENET_STD), min_length=3, max_length=3)

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _three(cls, v):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return [v, v, v]
        return v

    @field_validator("std")
    @classmethod
    def _positive(cls, v):
        if any(not (0 < x < 1e3) for x in v):
            raise ValueError("std values must be > 0")
        return v


class TrainSpec(BaseModel):
    """What to train and how. Every name is checked against an allow-list; nothing is evaluated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    model: Any = Field("resnet18", description="torchvision model name, or a list of torch.nn layers")
    weights_path: str | None = Field(None, description="local file of pretrained weights (a state dict)")
    optimizer: Any = Field(default_factory=lambda: dict(DEFAULT_OPTIMIZER))
    criterion: Any = Field(default_factory=lambda: dict(DEFAULT_CRITERION))
    lr_scheduler: Any = Field(default_factory=lambda: dict(DEFAULT_SCHEDULER))
    transform: Any = Field(default_factory=lambda: [dict(t) for t in DEFAULT_TRANSFORM])
    normalize: Normalize = Field(default_factory=Normalize)
    batch_size: int = Field(32, ge=1, le=4096)
    epochs: int = Field(8, ge=1, le=1000)
    image_size: int = Field(64, ge=16, le=1024)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    num_workers: int | str = Field("auto", description="DataLoader worker processes, or 'auto'")
    balance: str = Field("none", description="class imbalance: none, sampler (weighted sampler) or loss_weights")
    amp: bool = Field(True, description="bf16 mixed precision on CUDA (ignored on CPU)")
    channels_last: bool = Field(True, description="channels-last memory format on CUDA (ignored on CPU)")
    nproc_per_node: int = Field(1, ge=1, le=64, description="processes (GPUs) under torchrun + DDP; 1: no DDP")

    @model_validator(mode="before")
    @classmethod
    def _fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(f"a training spec is a JSON object, got {_show(data)}")
        data = dict(data)
        if "n_epoch" in data:  # the original's name
            if "epochs" in data:
                raise ValueError("give epochs or n_epoch, not both")
            data["epochs"] = data.pop("n_epoch")
        shorthand = {k: data.pop(k) for k in ("lr", "weight_decay") if k in data}
        if shorthand:  # {"lr": 0.01} is the optimizer's lr
            opt = data.get("optimizer", dict(DEFAULT_OPTIMIZER))
            opt = {"name": opt} if isinstance(opt, str) else opt
            if isinstance(opt, dict):
                for k, val in shorthand.items():
                    if k in opt and "optimizer" in data:
                        raise ValueError(f"{k} is given twice: at the top level and in optimizer")
                opt = {**opt, **shorthand}
            data["optimizer"] = opt
        unknown = [k for k in data if k not in cls.model_fields]
        if unknown:
            lines = []
            for k in unknown:
                hint = _ORIGINAL_HINTS.get(k)
                lines.append(f"unknown field {_show(k)}" + (f": {hint}" if hint else ""))
            raise ValueError("; ".join(lines) + f"; allowed fields: {_allowed(cls.model_fields)}")
        if "transform" in data:
            transforms, normalize = check_transform(data["transform"])
            data["transform"] = transforms
            if normalize is not None:
                if "normalize" in data:
                    raise ValueError("normalisation is given twice: in transform (Normalize) and in normalize")
                data["normalize"] = normalize
        return data

    @field_validator("model", mode="plain")
    @classmethod
    def _model(cls, v):
        return check_model(v)

    @field_validator("optimizer", mode="plain")
    @classmethod
    def _optimizer(cls, v):
        return check_named(v, OPTIMIZERS, "optimizer")

    @field_validator("criterion", mode="plain")
    @classmethod
    def _criterion(cls, v):
        return check_named(v, CRITERIA, "criterion")

    @field_validator("lr_scheduler", mode="plain")
    @classmethod
    def _scheduler(cls, v):
        if v is None or v == "none":
            return None
        return check_named(v, SCHEDULERS, "lr_scheduler")

    @field_validator("transform", mode="plain")
    @classmethod
    def _transform(cls, v):
        return v  # checked by _fields (it may also carry the normalisation)

    @field_validator("weights_path")
    @classmethod
    def _weights_path(cls, v):
        if v is not None and (not v.strip() or len(v) > 4096 or any(c in v for c in "\x00\n\r")):
            raise ValueError("weights_path must be a path to a local file")
        return v

    @field_validator("num_workers", mode="plain")
    @classmethod
    def _workers(cls, v):
        try:
            return INT(0, 64, tokens=("auto",)).check(v)
        except ValueError as exc:
            raise ValueError(f"must be {exc}") from None

    @field_validator("balance")
    @classmethod
    def _balance(cls, v):
        if v not in ("none", "sampler", "loss_weights"):
            raise ValueError("balance must be 'none', 'sampler' (a weighted sampler) or 'loss_weights' "
                             "(class weights in the loss)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "TrainSpec":
        layers = self.model if isinstance(self.model, list) else None
        last = layers[-1]["name"] if layers else None
        crit = self.criterion["name"]
        if crit == "NLLLoss" and last != "LogSoftmax":
            raise ValueError("criterion NLLLoss expects log-probabilities: use a layers model ending in LogSoftmax, "
                             "or CrossEntropyLoss")
        if last == "Softmax":
            raise ValueError("the model must not end in Softmax (the loss applies it); end with the logits "
                             "(e.g. Linear out_features \"n_labels\"), or LogSoftmax with NLLLoss")
        if layers and not any(l.get("out_features") == "n_labels" or l.get("out_channels") == "n_labels" for l in layers):
            raise ValueError("a layers model needs a layer whose out_features (or out_channels) is \"n_labels\"")
        return self

    # -- naming ------------------------------------------------------------------------------
    def digest(self) -> str:
        """Stable over everything that changes the result (not num_workers)."""
        data = self.model_dump(exclude={"num_workers"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]

    @property
    def model_label(self) -> str:
        return self.model.replace("_", "-") if isinstance(self.model, str) else f"layers{len(self.model)}"

    @property
    def is_layers(self) -> bool:
        return isinstance(self.model, list)


def format_errors(exc: ValidationError, prefix: str = "") -> list[str]:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{prefix}{where}: {msg}" if where else f"{prefix}{msg}".rstrip(": "))
    return lines


def parse_spec(data: Any) -> TrainSpec:
    """A dict (or a TrainSpec) -> TrainSpec, or SpecError with one line per problem."""
    if isinstance(data, TrainSpec):
        return data
    try:
        return TrainSpec.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise SpecError("invalid training spec:\n  " + "\n  ".join(format_errors(exc))) from None


def load_spec(path: str | Path) -> TrainSpec:
    """Read a JSON spec file (nothing but JSON is ever parsed) and check it."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read spec file {str(p)!r}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"spec file {str(p)!r} is not valid JSON: {exc}") from None
    return parse_spec(data)
