"""The training commands (`atscale train --local`, `runs`, `compare`, `evaluate`,
`predict`) on a real local store, `predict` of a URL over a real HTTP server on
127.0.0.1, and the Celery tasks' functions with a real Redis (the lease) and a real
queued message."""
from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.test_train import TINY_SPEC, draw, make_dataset
from workers.store import LocalStore

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def _clear_caches():
    from workers.settings import get_settings

    get_settings.cache_clear()
    if "tasks.pipeline" in sys.modules:
        sys.modules["tasks.pipeline"].get_store.cache_clear()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATSCALE_STORE", str(tmp / "store"))
        mp.setenv("ATSCALE_CACHE_DIR", str(tmp / "cache"))
        mp.delenv("ATSCALE_ALLOWED_NETWORKS", raising=False)
        _clear_caches()
        store = LocalStore(tmp / "store")
        make_dataset(store)
        spec_file = tmp / "spec.json"
        spec_file.write_text(json.dumps(TINY_SPEC))
        yield {"tmp": tmp, "store": store, "spec_file": spec_file}
    _clear_caches()


def atscale(capsys, *argv) -> tuple[int, str]:
    from tasks.cli import main

    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out + out.err


def atscale_json(capsys, *argv):
    rc, out = atscale(capsys, *argv, "--json")
    assert rc == 0, out
    return json.loads(out)


@pytest.fixture(scope="module")
def trained_run(env):
    from workers.train import run_name, train_run

    run = run_name("t", TINY_SPEC)
    train_run(env["store"], "t", run, TINY_SPEC, cache_dir=env["tmp"] / "cache")
    return run


def test_train_local_then_runs_and_show(env, capsys):
    spec_file = env["tmp"] / "sgd2.json"
    spec_file.write_text(json.dumps({**TINY_SPEC, "epochs": 2, "lr_scheduler": {"name": "StepLR", "step_size": 1}}))
    res = atscale_json(capsys, "train", "t", "--spec", str(spec_file), "--local")
    run = res["run"]
    assert res["status"] == "trained" and res["epochs"] == 2 and 0.5 <= res["val_accuracy"] <= 1
    metrics = env["store"].get_json(f"runs/{run}/metrics.json")
    assert metrics["val_accuracy"] == res["val_accuracy"]
    assert metrics["lr"] == pytest.approx([0.05, 0.005])  # StepLR(step_size=1, gamma=0.1) from the spec file

    again = atscale_json(capsys, "train", "t", "--spec", str(spec_file), "--local")
    assert again == {"run": run, "status": "trained", "val_accuracy": res["val_accuracy"], "skipped": "trained"}

    listed = atscale_json(capsys, "runs")
    row = next(r for r in listed if r["run"] == run)
    assert row["status"] == "trained" and row["dataset"] == "t" and row["epoch"] == 2
    assert row["val_accuracy"] == res["val_accuracy"] and row["model"] == "layers9"
    assert atscale_json(capsys, "runs", "--dataset", "other") == []

    shown = atscale_json(capsys, "runs", "show", run)
    assert shown["record"]["status"] == "trained" and shown["metrics"]["epochs"] == 2
    assert {"model.pt", "model.pt2", "metrics.json", "curves.png", "confusion.png", "record.json"} <= set(
        shown["artifacts"])
    rc, out = atscale(capsys, "runs", "show", run)  # the readable form
    assert rc == 0 and "per-class accuracy" in out and "blue-bars" in out

    rc, out = atscale(capsys, "runs", "show", "no-such-run")
    assert rc == 2 and "no run named 'no-such-run'" in out
    rc, out = atscale(capsys, "runs", "show", "../etc")
    assert rc == 2 and "not a valid run name" in out


def test_invalid_and_hostile_spec_files_are_refused_before_anything(env, capsys):
    before = env["store"].list("runs/")
    bad = env["tmp"] / "bad.json"
    bad.write_text(json.dumps({"model": "__import__('os').system('touch /tmp/atscale-pwned')"}))
    rc, out = atscale(capsys, "train", "t", "--spec", str(bad), "--local")
    assert rc == 2 and "unknown model" in out and "resnet18" in out
    bad.write_text(json.dumps({**TINY_SPEC, "model": [{"name": "Flatten"}, {"name": "Linear", "in_features": 5,
                                                                          "out_features": "n_labels"}]}))
    rc, out = atscale(capsys, "train", "t", "--spec", str(bad), "--local")
    assert rc == 2 and "in_features is 5 but the previous layer gives 3072" in out
    rc, out = atscale(capsys, "train", "no-such-dataset", "--spec", str(env["spec_file"]), "--local")
    assert rc == 2 and "no dataset 'no-such-dataset'" in out
    assert env["store"].list("runs/") == before
    assert not Path("/tmp/atscale-pwned").exists()


def test_compare_draws_the_runs_of_a_dataset_side_by_side(env, capsys, trained_run):
    from workers.train import run_name, train_run

    other = {**TINY_SPEC, "optimizer": {"name": "AdamW", "lr": 0.01}, "lr_scheduler": None}
    train_run(env["store"], "t", run_name("t", other), other, cache_dir=env["tmp"] / "cache")
    out_png = env["tmp"] / "compare.png"
    res = atscale_json(capsys, "compare", "t", "--out", str(out_png))
    runs = {r["run"]: r for r in res["runs"]}
    assert {trained_run, run_name("t", other)} <= set(runs)
    assert runs[run_name("t", other)]["optimizer"] == "AdamW" and runs[trained_run]["optimizer"] == "SGD"
    for r in runs.values():
        m = env["store"].get_json(f"runs/{r['run']}/metrics.json")
        assert r["val_accuracy"] == m["val_accuracy"] and r["epochs"] == m["epochs"]
    assert out_png.read_bytes()[:8] == PNG
    assert env["store"].get_bytes("comparisons/t.png") == out_png.read_bytes()
    assert {r["run"] for r in env["store"].get_json("comparisons/t.json")["runs"]} == set(runs)
    rc, out = atscale(capsys, "compare", "t")
    assert rc == 0 and "runs on t, best first" in out and "comparisons/t.png" in out
    rc, out = atscale(capsys, "compare", "nothing-here")
    assert rc == 1 and "no runs" in out


def test_evaluate_measures_the_best_checkpoint_on_a_validation_split(env, capsys, trained_run):
    store = env["store"]
    metrics = store.get_json(f"runs/{trained_run}/metrics.json")
    res = atscale_json(capsys, "evaluate", trained_run)
    # the same model on the same split: the accuracy recorded at the best epoch
    assert res["dataset"] == "t" and res["images"] == metrics["val_images"]
    assert res["accuracy"] == pytest.approx(metrics["val_accuracy"], abs=1e-5)
    assert res["confusion"] == metrics["confusion"]
    rec = store.get_json(f"runs/{trained_run}/record.json")
    assert rec["status"] == "evaluated" and rec["evaluations"]["t"]["accuracy"] == res["accuracy"]
    assert store.get_bytes(f"runs/{trained_run}/evaluations/t-confusion.png")[:8] == PNG

    # another dataset with a class the run never saw: its images are left out and counted
    rows = make_dataset(store, "t2", {"red-circles": 10, "blue-bars": 10, "green-boxes": 6}, val_percent=50)
    res2 = atscale_json(capsys, "evaluate", trained_run, "--dataset", "t2")
    known_val = sum(r["split"] == "val" and r["label"] != "green-boxes" for r in rows)
    assert res2["images"] == known_val and res2["left_out_images"] == 6 and res2["left_out_labels"] == ["green-boxes"]
    assert set(store.get_json(f"runs/{trained_run}/record.json")["evaluations"]) == {"t", "t2"}

    # asked to train again, an evaluated run is still a finished one
    from workers.train import train_run

    assert train_run(store, "t", trained_run, TINY_SPEC, cache_dir=env["tmp"] / "cache") == metrics


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(tmp_path)))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_predict_a_file_and_a_url(env, capsys, trained_run, http_root, monkeypatch):
    root, base = http_root
    (root / "red.jpg").write_bytes(draw("red-circles", 40))
    (root / "blue.jpg").write_bytes(draw("blue-bars", 41))
    (root / "page.html").write_text("<html><body>not an image</body></html>")

    res = atscale_json(capsys, "predict", trained_run, str(root / "red.jpg"), "--top", "2")
    assert [t["class"] for t in res["top"]][0] == "red-circles" and len(res["top"]) == 2
    assert res["top"][0]["probability"] >= res["top"][1]["probability"]
    assert sum(t["probability"] for t in res["top"]) == pytest.approx(1.0, abs=1e-3)

    # a loopback URL is refused unless its network is allow-listed (the downloader's rule)
    rc, out = atscale(capsys, "predict", trained_run, f"{base}/blue.jpg")
    assert rc == 2 and "cannot fetch the image" in out and "blocked" in out
    monkeypatch.setenv("ATSCALE_ALLOWED_NETWORKS", "127.0.0.0/8")
    _clear_caches()
    res = atscale_json(capsys, "predict", trained_run, f"{base}/blue.jpg")
    assert res["top"][0]["class"] == "blue-bars" and res["image"] == f"{base}/blue.jpg"
    rc, out = atscale(capsys, "predict", trained_run, f"{base}/page.html")
    assert rc == 2 and "not a usable image" in out and "html" in out
    rc, out = atscale(capsys, "predict", trained_run, str(root / "missing.jpg"))
    assert rc == 2 and "no such image file" in out
    monkeypatch.delenv("ATSCALE_ALLOWED_NETWORKS")
    _clear_caches()


@pytest.fixture
def redis_url(tmp_path):
    from tasks.embedded import Cluster

    with Cluster(tmp_path / "redis") as c:
        yield c.start_redis()


def test_training_tasks_with_a_real_redis(env, redis_url, monkeypatch, trained_run):
    """The tasks' functions as a worker runs them (the lease in a real Redis)."""
    monkeypatch.setenv("CELERY_BROKER_URL", redis_url)
    monkeypatch.setenv("CELERY_RESULT_BACKEND", redis_url)
    _clear_caches()
    import tasks.training as training
    from workers import coordination as co
    from workers.train import run_name

    spec = {**TINY_SPEC, "epochs": 2, "seed": 3}
    res = training.retrain.run("t", None, spec)
    run = run_name("t", spec)
    assert res["run"] == run and res["epochs"] == 2 and res["val_accuracy"] >= 0.5
    assert env["store"].get_json(f"runs/{run}/record.json")["status"] == "trained"
    assert not co.lease_alive(co.client(redis_url), f"train:{run}")  # released

    lease = co.Lease(co.client(redis_url), f"train:{run}", ttl=60)
    assert lease.acquire()
    try:  # another worker trains it: a second retrain does not start
        assert training.retrain.run("t", run, spec, force=True) == {"run": run, "dataset": "t", "skipped": "running"}
    finally:
        lease.release()

    ev = training.evaluate.run(trained_run)
    assert ev["run"] == trained_run and ev["dataset"] == "t" and 0 <= ev["accuracy"] <= 1
    with pytest.raises(ValueError, match="invalid training spec"):
        training.retrain.run("t", None, {"model": "eval"})
    _clear_caches()


def test_train_without_local_queues_a_retrain_message(env, redis_url):
    """`atscale train` as a user runs it: the spec is checked and built, the record says
    queued, and the message waits in Redis on the gpu queue for a gpu worker."""
    import redis

    e = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "ATSCALE_"))}
    e.update(CELERY_BROKER_URL=redis_url, CELERY_RESULT_BACKEND=redis_url, ATSCALE_STORE=str(env["tmp"] / "store"),
             PYTHONPATH=str(ROOT))
    spec_file = env["tmp"] / "queued.json"
    spec_file.write_text(json.dumps({**TINY_SPEC, "seed": 11}))
    out = subprocess.run([sys.executable, "-m", "tasks.cli", "train", "t", "--spec", str(spec_file), "--json"],
                         cwd=ROOT, env=e, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    from workers.train import run_name

    assert res["run"] == run_name("t", {**TINY_SPEC, "seed": 11}) and res["status"] == "queued"
    rec = env["store"].get_json(f"runs/{res['run']}/record.json")
    assert rec["status"] == "queued" and rec["queued_at"] > 0 and rec["spec"]["seed"] == 11
    r = redis.Redis.from_url(redis_url)
    assert r.llen("gpu") == 1
    msg = json.loads(r.lindex("gpu", 0))
    assert msg["headers"]["task"] == "atscale.retrain" and msg["headers"]["id"] == res["task_id"]
    assert "'t'" in msg["headers"]["argsrepr"] and res["run"] in msg["headers"]["argsrepr"]
