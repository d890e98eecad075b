"""Export a trained classifier so that it loads with torch alone (no atscale code).

`torch.jit.script`/`trace` are deprecated in this torch; the export is a
`torch.export` program saved with `torch.export.save` (`model.pt2`). The
normalisation is part of the program, so its input is what any image library
gives: float32 RGB in [0, 1], shape (N, 3, S, S), any N. Its output is one score
per class (softmax gives probabilities). Class names, image size and the resize
rule ride along inside the file (`extra_files["atscale.json"]`) and in
`export.json` beside it:

    import json, torch
    extra = {"atscale.json": ""}
    program = torch.export.load("model.pt2", extra_files=extra)
    meta = json.loads(extra["atscale.json"])
    scores = program.module()(batch)            # batch: (N, 3, S, S) float in [0, 1]
    top = meta["classes"][scores.argmax(1)[0]]
"""
from __future__ import annotations

import io
import json
import logging

log = logging.getLogger(__name__)

EXPORT_FILE = "model.pt2"
META_FILE = "atscale.json"


def _wrapper(model, mean, std):
    import torch

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, x):
            return self.model((x - self.mean) / self.std)

    return Classifier().eval()


def export_meta(classes: list[str], image_size: int, run: str, resize: int) -> dict:
    return {
        "format": "torch.export (torch.export.load)",
        "run": run,
        "classes": classes,
        "image_size": image_size,
        "input": f"float32 RGB in [0, 1], shape (N, 3, {image_size}, {image_size}); resize the shorter side to "
                 f"{resize} px, then centre-crop {image_size}x{image_size}; normalisation is inside the program",
        "resize": resize,
        "output": "one score (logit) per class, in the order of `classes`; softmax gives probabilities",
    }


def export_program(model, *, mean, std, image_size: int, meta: dict) -> bytes:
    """`model`: an eval-mode float32 CPU module. Returns the bytes of a .pt2 file with a
    dynamic batch dimension (a fixed batch of 1 where the model cannot be exported
    with a dynamic one)."""
    import torch

    wrapped = _wrapper(model, mean, std)
    example = (torch.rand(2, 3, image_size, image_size),)
    try:
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.export.export(wrapped, example, dynamic_shapes={"x": {0: batch}})
        meta = {**meta, "batch": "any"}
    except Exception as exc:  # some architectures specialise on the batch size
        log.warning("dynamic-batch export failed (%s); exporting with a batch of 1", exc)
        program = torch.export.export(wrapped, (example[0][:1],))
        meta = {**meta, "batch": 1}
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={META_FILE: json.dumps(meta)})
    return buf.getvalue()


def load_program(source):
    """(callable module, meta) from a path, file object or bytes: torch only."""
    import torch

    f = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    extra = {META_FILE: ""}
    program = torch.export.load(f, extra_files=extra)
    return program.module(), json.loads(extra[META_FILE])
