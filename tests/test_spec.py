"""The training spec: schema, allow-lists, clear refusals, hostile input, builders."""
from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from workers.spec import (ALLOWED_MODELS, CRITERIA, LAYERS, OPTIMIZERS, SCHEDULERS, TRANSFORMS, SpecError, TrainSpec,
                          load_spec, parse_spec)
from workers.train import run_name

ROOT = Path(__file__).resolve().parent.parent

TINY_LAYERS = [
    {"name": "Conv2d", "out_channels": 8, "kernel_size": 3, "padding": 1},
    {"name": "ReLU"},
    {"name": "MaxPool2d", "kernel_size": 2},
    {"name": "Conv2d", "in_channels": "auto", "out_channels": 16, "kernel_size": 3},
    {"name": "BatchNorm2d", "num_features": "auto"},
    {"name": "ReLU", "inplace": True},
    {"name": "Flatten"},
    {"name": "Linear", "in_features": "auto", "out_features": 24},
    {"name": "ReLU"},
    {"name": "Linear", "in_features": "auto", "out_features": "n_labels"},
]


def readme_specs() -> list[dict]:
    """The JSON examples of the README's "Training spec" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Training spec", 1)[1].split("\n## ", 1)[0]
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", section, re.S)]


def test_defaults_are_valid_fast_and_named_deterministically():
    s = TrainSpec()
    assert s.model == "resnet18" and s.image_size == 64 and s.epochs == 8 and s.batch_size == 32
    assert s.optimizer == {"name": "AdamW", "lr": 0.002, "weight_decay": 0.0005}
    assert s.lr_scheduler == {"name": "CosineAnnealingLR", "T_max": "epochs"}
    assert parse_spec(s.model_dump()) == s  # a dump validates back to the same spec (Celery sends the dump)
    assert run_name("d", TrainSpec()) == run_name("d", {}) == f"d-resnet18-{s.digest()}"
    assert run_name("d", TrainSpec()) != run_name("d", TrainSpec(epochs=3))
    assert run_name("d", TrainSpec()) == run_name("d", TrainSpec(num_workers=0))  # does not change the result
    assert re.fullmatch(r"d-layers10-[0-9a-f]{8}", run_name("d", {"model": TINY_LAYERS}))


def test_readme_examples_are_valid():
    specs = readme_specs()
    assert len(specs) >= 2
    full = parse_spec(specs[0])
    assert full.is_layers and full.lr_scheduler["name"] == "OneCycleLR" and full.balance == "sampler"
    assert set(specs[0]) == set(TrainSpec.model_fields)  # the complete example names every field
    for spec in specs[1:]:
        parse_spec(spec)


def test_original_project_form_is_accepted():
    """The original's training command: model {"name": "", "layers": [...]}, n_epoch,
    optimizer/criterion dicts and the {"ToTensor": true, "Normalize": {...}} transform."""
    s = parse_spec({
        "model": {"name": "", "layers": TINY_LAYERS},
        "criterion": {"name": "CrossEntropyLoss"},
        "optimizer": {"name": "SGD", "lr": 0.001, "momentum": 0.9},
        "batch_size": 4, "n_epoch": 3,
        "transform": {"ToTensor": True, "Normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}},
    })
    assert s.is_layers and s.epochs == 3 and s.optimizer == {"name": "SGD", "lr": 0.001, "momentum": 0.9}
    assert s.transform == [] and s.normalize.mean == [0.5, 0.5, 0.5]
    assert s.model[0] == {"name": "Conv2d", "in_channels": "auto", "out_channels": 8, "kernel_size": 3, "padding": 1}
    # top-level lr / weight_decay are the optimizer's
    assert parse_spec({"lr": 0.01}).optimizer == {"name": "AdamW", "lr": 0.01, "weight_decay": 0.0005}


@pytest.mark.parametrize("bad, expected", [
    ({"model": "resnet9000"}, ["model: unknown model \"resnet9000\"", "resnet18", "mobilenet_v3_small"]),
    ({"model": [{"name": "Conv3d", "out_channels": 3, "kernel_size": 3}]},
     ["layer 0: unknown layer \"Conv3d\"", "Conv2d", "Linear"]),
    ({"model": [{"name": "Linear", "out_features": "n_labels", "bias": "yes"}]},
     ["layer 0 (Linear): bias must be true or false, got \"yes\""]),
    ({"model": [{"name": "Conv2d", "kernel_size": 3}, {"name": "Flatten"}]}, ["out_channels is required"]),
    ({"model": [{"name": "Linear", "out_features": "n_labels", "weight_init": "x"}]},
     ["unknown parameter \"weight_init\"; allowed: in_features, out_features, bias"]),
    ({"model": [{"name": "Flatten"}, {"name": "Linear", "out_features": 10}]}, ["\"n_labels\""]),
    ({"model": TINY_LAYERS + [{"name": "Softmax", "dim": 1}]}, ["must not end in Softmax"]),
    ({"optimizer": {"name": "LBFGS"}}, ["optimizer: unknown optimizer \"LBFGS\"", "AdamW", "SGD"]),
    ({"optimizer": {"name": "SGD", "lr": -1}}, ["SGD: lr must be a number in (0, 10], got -1"]),
    ({"optimizer": {"name": "Adam", "fused": True}}, ["unknown parameter \"fused\""]),
    ({"criterion": "NLLLoss"}, ["NLLLoss expects log-probabilities"]),
    ({"criterion": {"name": "CrossEntropyLoss", "weight": [1, 2]}}, ["unknown parameter \"weight\""]),
    ({"lr_scheduler": {"name": "StepLR"}}, ["StepLR: step_size is required"]),
    ({"lr_scheduler": "LambdaLR"}, ["unknown lr_scheduler \"LambdaLR\"", "CosineAnnealingLR"]),
    ({"transform": [{"name": "Lambda"}]}, ["unknown transform \"Lambda\"", "RandomResizedCrop"]),
    ({"transform": [{"name": "RandomResizedCrop", "interpolation": "lanczos9"}]},
     ["interpolation must be one of \"nearest\", \"bilinear\", \"bicubic\""]),
    ({"epochs": 0}, ["epochs"]),
    ({"image_size": 8}, ["image_size"]),
    ({"balance": "oversample"}, ["balance must be 'none', 'sampler'"]),
    ({"n_labels": 9}, ["unknown field \"n_labels\": the number of classes comes from the dataset"]),
    ({"optimizer_code": "x"}, ["unknown field \"optimizer_code\"", "allowed fields: model"]),
    ({"lr": 0.1, "optimizer": {"name": "SGD", "lr": 0.2}}, ["lr is given twice"]),
    ({"num_workers": -1}, ["num_workers: must be an integer in [0, 64] or 'auto'"]),
    ("resnet18", ["a training spec is a JSON object"]),
])
def test_refusals_say_what_is_wrong_and_what_is_allowed(bad, expected):
    with pytest.raises(SpecError) as err:
        parse_spec(bad)
    text = str(err.value)
    assert text.startswith("invalid training spec:")
    for fragment in expected:
        assert fragment in text, text


HOSTILE = r'''
import json, sys
from workers.spec import SpecError, parse_spec

parse_spec({"model": "resnet18"})  # warm: the validator's own lazy imports happen here, not below
try:
    parse_spec({"model": "nope"})
except SpecError:
    pass
marker = sys.argv[1]
hostile = [
    {"model": f"__import__('os').system('touch {marker}')"},
    {"model": "__import__('antigravity')"},
    {"model": "exec(\"import webbrowser\")"},
    {"model": [{"name": "os.system", "command": f"touch {marker}"}]},
    {"model": [{"name": "__import__", "x": "antigravity"}]},
    {"model": [{"name": "Conv2d", "out_channels": "__import__('antigravity')", "kernel_size": 3}]},
    {"model": [{"name": "Linear", "out_features": "n_labels", "__class__": "x"}]},
    {"transform": [{"name": "eval", "source": f"open('{marker}', 'w')"}]},
    {"transform": {"Lambda": {"lambd": "lambda x: __import__('antigravity')"}}},
    {"optimizer": {"name": "torch.optim.SGD; import antigravity"}},
    {"optimizer": {"name": "SGD", "lr": "__import__('antigravity')"}},
    {"criterion": {"name": "__builtins__"}},
    {"lr_scheduler": {"name": "LambdaLR", "lr_lambda": "lambda e: __import__('antigravity')"}},
    {"normalize": {"mean": "__import__('antigravity')"}},
    {"__import__('antigravity')": 1},
]
before = set(sys.modules)
refused = 0
for spec in hostile:
    try:
        parse_spec(spec)
    except SpecError:
        refused += 1
print(json.dumps({"refused": refused, "total": len(hostile), "new_modules": sorted(set(sys.modules) - before),
                  "torch": "torch" in sys.modules, "antigravity": "antigravity" in sys.modules,
                  "webbrowser": "webbrowser" in sys.modules}))
'''


def test_hostile_specs_are_refused_before_anything_is_imported_or_created(tmp_path):
    marker = tmp_path / "pwned"
    out = subprocess.run([sys.executable, "-c", HOSTILE, str(marker)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["refused"] == res["total"] == 15
    assert res["new_modules"] == []  # validation imported nothing at all
    assert not res["torch"] and not res["antigravity"] and not res["webbrowser"]
    assert not marker.exists()


def test_spec_file_must_be_json(tmp_path):
    p = tmp_path / "spec.json"
    p.write_text("{'model': __import__('os')}")
    with pytest.raises(SpecError, match="is not valid JSON"):
        load_spec(p)
    with pytest.raises(SpecError, match="cannot read spec file"):
        load_spec(tmp_path / "missing.json")
    p.write_text(json.dumps({"model": "mobilenet_v3_small", "epochs": 2}))
    assert load_spec(p).model == "mobilenet_v3_small"


def test_allow_lists_match_what_torch_and_torchvision_accept():
    """Every allow-listed name exists, and every allow-listed parameter is a real
    parameter of it (so a checked spec never fails on a parameter name)."""
    import torch
    import torchvision
    from torchvision.transforms import v2

    assert set(ALLOWED_MODELS) <= set(torchvision.models.list_models(module=torchvision.models))
    for module, table in ((torch.nn, LAYERS), (torch.optim, OPTIMIZERS), (torch.nn, CRITERIA),
                          (torch.optim.lr_scheduler, SCHEDULERS), (v2, TRANSFORMS)):
        for name, params in table.items():
            real = inspect.signature(getattr(module, name)).parameters
            assert set(params) <= set(real), (name, set(params) - set(real))


# -- builders -----------------------------------------------------------------------------------------
def test_layers_are_built_with_auto_sizes_and_n_labels():
    import torch

    from workers.build import build_model

    model, _ = build_model(parse_spec({"model": TINY_LAYERS, "image_size": 32}), 5)
    conv2, bn, lin1, lin2 = model[3], model[4], model[7], model[9]
    assert conv2.in_channels == 8 and bn.num_features == 16
    assert lin1.in_features == 16 * 14 * 14 and lin2.in_features == 24 and lin2.out_features == 5
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize("layers, message", [
    ([{"name": "Conv2d", "out_channels": 4, "kernel_size": 3}, {"name": "Linear", "out_features": "n_labels"}],
     "layer 1 (Linear): gets an input of shape (1, 4, 30, 30); a Linear layer here needs a 2-d input: add"),
    ([{"name": "Flatten"}, {"name": "Linear", "in_features": 100, "out_features": "n_labels"}],
     "layer 1 (Linear): in_features is 100 but the previous layer gives 3072"),
    ([{"name": "Conv2d", "out_channels": 4, "kernel_size": 64}, {"name": "Flatten"},
      {"name": "Linear", "out_features": "n_labels"}], "layer 0 (Conv2d): does not fit an input of shape (1, 3, 32, 32)"),
    ([{"name": "Flatten"}, {"name": "Linear", "out_features": "n_labels"}, {"name": "Linear", "out_features": 7}],
     "the model's output has shape (1, 7)"),
    # sizes that would exhaust memory are refused before anything is allocated
    ([{"name": "Conv2d", "out_channels": 10_000_000, "kernel_size": 1}, {"name": "Flatten"},
      {"name": "Linear", "out_features": "n_labels"}], "layer 0 (Conv2d): gives 10,240,000,000 values per image"),
    ([{"name": "Flatten"}, {"name": "Linear", "out_features": 1_000_000}, {"name": "Linear", "out_features": "n_labels"}],
     "layer 1 (Linear): the model would have more than 1,000,000,000 parameters"),
])
def test_layers_that_do_not_fit_are_refused_before_training(layers, message):
    from workers.build import BuildError, check_buildable

    with pytest.raises(BuildError) as err:
        check_buildable(parse_spec({"model": layers, "image_size": 32}), 3)
    assert message in str(err.value)


def test_optimizer_criterion_scheduler_and_transforms_are_built_from_the_spec():
    import torch
    from PIL import Image

    from workers.build import build_criterion, build_model, build_optimizer, build_scheduler, train_transform

    spec = parse_spec({
        "model": TINY_LAYERS, "image_size": 40, "epochs": 4,
        "optimizer": {"name": "SGD", "lr": 0.05, "momentum": 0.9, "nesterov": True},
        "criterion": {"name": "CrossEntropyLoss", "label_smoothing": 0.1},
        "lr_scheduler": {"name": "MultiStepLR", "milestones": [2, 3], "gamma": 0.5},
        "transform": [{"name": "Resize", "size": 50}, {"name": "RandomCrop", "size": "image_size"},
                      {"name": "Grayscale"}, {"name": "RandAugment", "num_ops": 1},
                      {"name": "GaussianBlur", "kernel_size": [3, 3]}, {"name": "RandomErasing", "p": 1.0}],
    })
    model, _ = build_model(spec, 3)
    opt = build_optimizer(spec, model.parameters())
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["nesterov"] is True
    crit = build_criterion(spec, [0.5, 1.0, 2.0])
    assert crit.label_smoothing == 0.1 and crit.weight.tolist() == [0.5, 1.0, 2.0]
    sched, per_batch, watches = build_scheduler(spec, opt, 10)
    assert isinstance(sched, torch.optim.lr_scheduler.MultiStepLR) and not per_batch and not watches
    x = train_transform(spec)(Image.new("RGB", (123, 77), (200, 30, 30)))
    assert x.shape == (3, 40, 40) and x.dtype == torch.float32
    mean, std = torch.tensor(spec.normalize.mean).view(3, 1, 1), torch.tensor(spec.normalize.std).view(3, 1, 1)
    pixels = x * std + mean  # grayscale: before normalisation, the three channels are equal
    assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[1], pixels[2], atol=1e-5)

    one = parse_spec({"model": TINY_LAYERS, "epochs": 3, "optimizer": {"name": "AdamW", "lr": 0.01},
                      "lr_scheduler": {"name": "OneCycleLR"}})
    sched, per_batch, _ = build_scheduler(one, build_optimizer(one, build_model(one, 2)[0].parameters()), 7)
    assert per_batch and sched.total_steps == 21 and sched.optimizer.param_groups[0]["max_lr"] == 0.01
