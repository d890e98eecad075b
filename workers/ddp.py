"""Training on several devices: torchrun + DistributedDataParallel.

`train_run` with `nproc_per_node > 1` calls `launch`, which runs

    python -m torch.distributed.run --standalone --nproc_per_node N -m workers.ddp --store URL ...

and waits. Each process initialises the process group (NCCL on CUDA, one GPU per
local rank; gloo on CPU), then runs the same `train_process` as a single-device
run with its rank: every rank trains on its share of each epoch, validation sums
are all-reduced, rank 0 writes the record, checkpoints and artifacts.
On a gpu worker, make the GPUs visible: `CUDA_VISIBLE_DEVICES=0,1,2,3`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from workers.spec import TrainSpec, parse_spec
from workers.store import ObjectStore, open_store

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent


def command(store_url: str, dataset: str, run: str, spec: TrainSpec, *, cache_dir, force: bool) -> list[str]:
    # one JSON argument: torchrun's own parser would otherwise read options such as --run as its own
    job = {"store": store_url, "dataset": dataset, "run": run, "cache_dir": str(cache_dir), "force": force,
           "spec": spec.model_dump()}
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={spec.nproc_per_node}",
            "-m", "workers.ddp", json.dumps(job)]


def launch(store: ObjectStore, dataset: str, run: str, spec: TrainSpec, *, cache_dir, force: bool = False) -> dict:
    from workers.runs import read_record, run_key, update_record

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if "OMP_NUM_THREADS" not in env:  # share the cores between the processes (torchrun would say 1)
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // spec.nproc_per_node))
    cmd = command(store.url, dataset, run, spec, cache_dir=cache_dir, force=force)
    log.info("run %s: starting %d processes under torchrun", run, spec.nproc_per_node)
    proc = subprocess.run(cmd, env=env, cwd=str(ROOT))
    rec = read_record(store, run) or {}
    if proc.returncode != 0:
        reason = rec.get("reason") if rec.get("status") == "failed" else None
        if not reason:
            reason = f"torchrun exited with status {proc.returncode}"
            update_record(store, run, "failed", reason=reason)
        raise RuntimeError(f"distributed training of run {run} failed: {reason}")
    return store.get_json(run_key(run, "metrics.json"))


def main(argv: list[str] | None = None) -> int:
    import torch
    import torch.distributed as dist

    from workers.train import Dist, train_process

    p = argparse.ArgumentParser(prog="python -m workers.ddp", description="one rank of a DDP training (torchrun)")
    p.add_argument("job", help='JSON: {"store", "dataset", "run", "cache_dir", "force", "spec"}')
    job = json.loads(p.parse_args(argv).job)
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', '?')}] %(levelname)s %(message)s")
    spec = parse_spec(job["spec"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    try:
        ctx = Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)
        train_process(open_store(job["store"]), job["dataset"], job["run"], spec, cache_dir=job["cache_dir"],
                      force=bool(job["force"]), dist=ctx)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
