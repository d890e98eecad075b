"""`atscale demo` stopped with SIGTERM in the middle of a training: it says so, exits
143, leaves no process behind, and the training is not marked failed (its workers are
stopped before Redis, and the DataLoader's processes are not signalled under it)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if text in cmdline or text.encode() in environ:
            found.append(f"{entry.name}: {cmdline[:120]}")
    return found


def test_demo_stopped_mid_training(tmp_path):
    store, workdir = tmp_path / "store", tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "SERPAPI_", "ATSCALE_"))}
    env.update(ATSCALE_STORE=str(store), ATSCALE_STOP_TEST=str(tmp_path))  # the marker finds every process it started
    proc = subprocess.Popen([sys.executable, "-m", "tasks.cli", "demo", "--queries", "Pug", "Beagle", "--pages", "1",
                             "--epochs", "500", "--dataset", "stop-test", "--workdir", str(workdir)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        record = None
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            status = store / "datasets" / "stop-test" / "status.json"
            if status.exists():
                st = json.loads(status.read_text())
                rec_file = store / "runs" / str(st.get("run")) / "record.json"
                if st.get("state") == "training" and rec_file.exists():
                    record = json.loads(rec_file.read_text())
                    if record.get("epoch", 0) >= 1:
                        break
            time.sleep(0.5)
        assert record and record.get("epoch", 0) >= 1, "the training never got going"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = out.decode(errors="replace")
    assert proc.returncode == 143, text[-2000:]
    assert "stopping the workers, then Redis" in text
    time.sleep(1)
    assert _processes_mentioning(str(tmp_path)) == []  # workers, pools, DataLoader workers, Redis, replay: all gone
    st = json.loads((store / "datasets" / "stop-test" / "status.json").read_text())
    rec = json.loads((store / "runs" / st["run"] / "record.json").read_text())
    assert st["state"] != "failed" and rec.get("status") != "failed", (st, rec)
    gpu_log = (workdir / "gpu.log").read_text(errors="replace")
    assert "DataLoader worker" not in gpu_log and "ConnectionError" not in gpu_log, gpu_log[-3000:]
