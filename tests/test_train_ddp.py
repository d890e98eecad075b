"""Several devices: the training under torchrun with DistributedDataParallel, here two
CPU processes with the gloo backend."""
from __future__ import annotations

import io
import math

from tests.test_train import TINY_SPEC, make_dataset
from workers.store import LocalStore
from workers.train import TrainSpec, run_name, train_run


def test_two_process_gloo_training_under_torchrun(tmp_path):
    import torch

    store = LocalStore(tmp_path / "store")
    rows = make_dataset(store)
    spec = TrainSpec(**{**TINY_SPEC, "epochs": 3, "nproc_per_node": 2})
    run = run_name("t", spec)
    m = train_run(store, "t", run, spec, cache_dir=tmp_path / "cache")

    n_train = sum(r["split"] == "train" for r in rows)
    n_val = len(rows) - n_train
    assert m["world_size"] == 2 and m["device"] == "cpu"
    assert m["train_images"] == n_train and m["val_images"] == n_val
    per_rank = math.ceil(n_train / 2)  # each rank gets half of the (padded) epoch
    per_rank -= 1 if per_rank % spec.batch_size == 1 and per_rank > spec.batch_size else 0
    for e in m["per_epoch"]:
        # the sums of both ranks: the training samples of the whole epoch, each validation image once
        assert e["train_samples"] == 2 * per_rank >= n_train - 2
        assert e["val_samples"] == n_val
    assert sum(map(sum, m["confusion"])) == n_val
    assert m["epochs"] == 3 and m["val_accuracy"] >= 0.75

    rec = store.get_json(f"runs/{run}/record.json")
    assert rec["status"] == "trained" and rec["world_size"] == 2 and rec["attempts"] == 1
    ck = torch.load(io.BytesIO(store.get_bytes(f"runs/{run}/model.pt")), weights_only=True)
    assert not any(k.startswith("module.") for k in ck["state_dict"])  # the plain model, not the DDP wrapper
    assert ck["classes"] == ["blue-bars", "red-circles"]
    assert store.exists(f"runs/{run}/model.pt2") and not store.exists(f"runs/{run}/checkpoint.pt")
