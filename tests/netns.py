"""Several real hosts on one Linux machine: network namespaces on a private bridge.

    lab = Lab(["hub", "dl1", "dl2", "dl3", "gpu", "ops"])   # root only
    with lab:
        proc = lab["hub"].run(["redis-server", "--bind", lab["hub"].addr], env)
        ...
        lab["dl3"].link_down()        # the cable pulled at the switch
        lab["dl3"].kill_all()         # then every process of that host killed

Layout (all names start with ``ats<pid>-``, so that two runs never meet and a run
that crashed is recognised and cleaned up by the next one):

- a "switch" namespace holding a Linux bridge; every host namespace is connected to
  it by a veth pair (``eth0`` in the host, ``p-<host>`` on the bridge);
- each host gets one address of a private /24 (``10.77.N.0/24``, N chosen so that it
  overlaps no route of this machine), ``lo`` up, and NO default route: a process in a
  host can reach the other hosts and nothing else;
- each process is started in its own UTS namespace with the host's name as hostname,
  so ``celery worker -n download@%h`` names every worker after its host, as on real
  machines;
- the root namespace gets one more veth on the bridge (``ats<pid>o``, address .254,
  no forwarding, no NAT): the test process itself can talk to the hosts, like an
  operator's laptop on the same network.

Nothing here ever sends a packet anywhere but to these addresses. ``close()`` (also
on exceptions: use the context manager) kills every process left in every namespace
and deletes the namespaces, the bridge and the veths.
"""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from tasks.embedded import wait_port

IP = shutil.which("ip") or "/usr/sbin/ip"
NAME_RE = re.compile(r"^ats(\d+)-")
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be built here; the message says why."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip() or out.stdout.strip()}")
    return out


def unavailable_reason() -> str | None:
    """None when network namespaces can be built here; else why not, in words."""
    if os.name != "posix" or not Path("/proc/self/ns/net").exists():
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return ("building hosts with network namespaces (ip netns, veth, bridge) needs root; "
                "run the suite as root (CI does)")
    if not Path(IP).exists():
        return "the `ip` command (iproute2) is missing: apt-get install iproute2"
    if not shutil.which("unshare"):
        return "the `unshare` command (util-linux) is missing"
    probe = f"ats{os.getpid()}-probe"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"cannot create a network namespace (`ip netns add` said: {made.stderr.strip()})"
        veth = _ip("-n", probe, "link", "add", "name", "va", "type", "veth", "peer", "name", "vb", check=False)
        if veth.returncode != 0:
            return f"cannot create a veth pair in a namespace: {veth.stderr.strip()}"
        br = _ip("-n", probe, "link", "add", "name", "br0", "type", "bridge", check=False)
        if br.returncode != 0:
            return f"cannot create a bridge in a namespace: {br.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False)
    return [int(x) for x in out.stdout.split() if x.isdigit()]


def _kill_netns(ns: str, grace: float = 0.0) -> None:
    """Every process in namespace ``ns``: SIGTERM, ``grace`` seconds, then SIGKILL."""
    pids = _netns_pids(ns)
    if grace and pids:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        end = time.time() + grace
        while time.time() < end and _netns_pids(ns):
            time.sleep(0.1)
    for _ in range(50):
        pids = _netns_pids(ns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def list_namespaces() -> list[str]:
    out = _ip("netns", "list", check=False)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def cleanup_leftovers() -> list[str]:
    """Remove what an earlier run that crashed left behind: namespaces named
    ``ats<pid>-*`` and root-namespace links ``ats<pid>o`` whose pid is not alive."""
    removed = []
    for ns in list_namespaces():
        m = NAME_RE.match(ns)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        _kill_netns(ns)
        _ip("netns", "del", ns, check=False)
        removed.append(ns)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        m = re.match(r"^\d+:\s+(ats(\d+)o)[@:]", line)
        if m and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
            _ip("link", "del", m.group(1), check=False)
            removed.append(m.group(1))
    return removed


def pick_subnet() -> ipaddress.IPv4Network:
    """A private /24 that overlaps no route (and no other run's bridge) on this machine."""
    used = []
    for line in _ip("-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        dest = line.split()[0] if line.split() else ""
        if dest in ("default", "broadcast", "local", "unreachable"):
            dest = line.split()[1] if len(line.split()) > 1 else ""
        try:
            used.append(ipaddress.ip_network(dest, strict=False))
        except ValueError:
            continue
    start = os.getpid() % 200
    for i in range(256):
        net = ipaddress.ip_network(f"10.77.{(start + i) % 256}.0/24")
        if not any(net.overlaps(u) for u in used if u.version == 4 and u.prefixlen > 0):
            return net
    raise NetnsUnavailable("no free 10.77.x.0/24 subnet on this machine")


def clean_env(extra: dict | None = None) -> dict:
    """This process's environment without any cluster setting or proxy: what each host
    gets before its own variables are added."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CELERY_", "SERPAPI_", "ATSCALE_", "AWS_", "FLOWER_"))
           and k.lower() not in PROXY_VARS}
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


class Host:
    """One machine: a network namespace with one address on the lab's bridge."""

    def __init__(self, lab: "Lab", name: str, addr: str, workdir: Path):
        self.lab, self.name, self.addr = lab, name, addr
        self.netns = f"{lab.prefix}-{name}"
        self.port = f"p-{name}"  # its port on the switch
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def __repr__(self) -> str:
        return f"Host({self.name}, {self.addr})"

    def command(self, cmd: list[str]) -> list[str]:
        """``cmd`` as run on this host: in its network namespace, with its own hostname."""
        return [IP, "netns", "exec", self.netns, "unshare", "--uts", "--",
                "sh", "-c", 'hostname "$0" && exec "$@"', self.name, *[str(c) for c in cmd]]

    def run(self, cmd: list[str], env: dict | None = None, *, name: str | None = None, stdout=None,
            cwd: str | os.PathLike | None = None, pass_fds=()) -> subprocess.Popen:
        """Start ``cmd`` on this host (its own session; output to ``<workdir>/<name>.log``
        unless ``stdout`` is given). Returns the Popen of the command itself."""
        name = name or Path(str(cmd[0])).name
        log = open(self.workdir / f"{name}.log", "ab")
        proc = subprocess.Popen(self.command(cmd), env=env if env is not None else clean_env(), cwd=cwd,
                                stdout=stdout if stdout is not None else log,
                                stderr=log, start_new_session=True, pass_fds=pass_fds)
        log.close()
        self.procs.append((name, proc))
        return proc

    def check_output(self, cmd: list[str], env: dict | None = None, timeout: float = 120, **kw) -> str:
        out = subprocess.run(self.command(cmd), env=env if env is not None else clean_env(), capture_output=True,
                             text=True, timeout=timeout, **kw)
        if out.returncode != 0:
            raise RuntimeError(f"{cmd[:4]} on {self.name} exited {out.returncode}: {out.stderr[-2000:]}")
        return out.stdout

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def pids(self) -> list[int]:
        return _netns_pids(self.netns)

    def link_down(self) -> None:
        """Pull the cable: this host's port on the switch goes down; packets to and from
        it are lost from now on (no reset, no goodbye)."""
        _ip("-n", self.lab.switch, "link", "set", self.port, "down")

    def link_up(self) -> None:
        _ip("-n", self.lab.switch, "link", "set", self.port, "up")

    def kill(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Signal the processes started as ``name`` (their whole session) and wait for them."""
        for n, proc in list(self.procs):
            if n == name and proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)

    def kill_all(self, grace: float = 0.0) -> None:
        """Every process on this host, whoever started it (SIGKILL after ``grace`` s)."""
        _kill_netns(self.netns, grace)
        for _n, proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


class Lab:
    """Hosts on one private bridge. Use as a context manager; ``close()`` removes everything."""

    def __init__(self, names: list[str], workdir: str | os.PathLike, first_host: int = 1):
        self.prefix = f"ats{os.getpid()}"
        self.switch = f"{self.prefix}-sw"
        self.root_link = f"{self.prefix}o"
        self.workdir = Path(workdir)
        self.names = list(names)
        self.first_host = first_host
        self.hosts: dict[str, Host] = {}
        self.subnet: ipaddress.IPv4Network | None = None
        self.operator_addr: str | None = None

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> "Lab":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> "Lab":
        reason = unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        cleanup_leftovers()
        self.subnet = pick_subnet()
        addrs = list(self.subnet.hosts())
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "name", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            _ip("-n", self.switch, "link", "set", "lo", "up")
            for i, name in enumerate(self.names):
                host = Host(self, name, str(addrs[self.first_host - 1 + i]), self.workdir / name)
                _ip("netns", "add", host.netns)
                self.hosts[name] = host
                _ip("-n", self.switch, "link", "add", "name", host.port, "type", "veth", "peer", "name", "eth0",
                    "netns", host.netns)
                _ip("-n", self.switch, "link", "set", host.port, "master", "br0", "up")
                _ip("-n", host.netns, "addr", "add", f"{host.addr}/{self.subnet.prefixlen}", "dev", "eth0")
                _ip("-n", host.netns, "link", "set", "eth0", "up")
                _ip("-n", host.netns, "link", "set", "lo", "up")
            # the operator's link (this process): an address on the bridge, nothing more
            self.operator_addr = str(addrs[-1])
            _ip("link", "add", "name", self.root_link, "type", "veth", "peer", "name", "p-operator", "netns", self.switch)
            _ip("-n", self.switch, "link", "set", "p-operator", "master", "br0", "up")
            _ip("addr", "add", f"{self.operator_addr}/{self.subnet.prefixlen}", "dev", self.root_link)
            _ip("link", "set", self.root_link, "up")
            self.wait_reachable()
        except BaseException:
            self.close()
            raise
        return self

    def wait_reachable(self, timeout: float = 10) -> None:
        """Until the kernel has brought every link up (a first packet may be lost before)."""
        end = time.time() + timeout
        pending = set(self.hosts)
        while pending and time.time() < end:
            for name in list(pending):
                out = _ip("-n", self.hosts[name].netns, "-o", "link", "show", "eth0", check=False).stdout
                if "LOWER_UP" in out and "tentative" not in _ip("-n", self.hosts[name].netns, "-4", "addr", "show",
                                                                 "eth0", check=False).stdout:
                    pending.discard(name)
            time.sleep(0.05)
        if pending:
            raise RuntimeError(f"links of {sorted(pending)} did not come up")

    def close(self) -> None:
        for host in self.hosts.values():
            for _n, proc in host.procs:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
        for host in self.hosts.values():
            _kill_netns(host.netns, grace=5.0)
            for _n, proc in host.procs:
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            _ip("netns", "del", host.netns, check=False)
        _kill_netns(self.switch)
        _ip("netns", "del", self.switch, check=False)
        _ip("link", "del", self.root_link, check=False)  # normally gone with its peer already
        self.hosts.clear()

    def leftovers(self) -> list[str]:
        """Namespaces and links of this run still present (empty after close())."""
        mine = [ns for ns in list_namespaces() if ns.startswith(self.prefix + "-")]
        links = _ip("-o", "link", "show", check=False).stdout
        if re.search(rf"^\d+:\s+{self.root_link}[@:]", links, re.M):
            mine.append(self.root_link)
        return mine


# ---------------------------------------------------------------------------
# atscale on those hosts
# ---------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
HUB_PORTS = {"redis": 6379, "s3": 9000, "replay": 8765, "flower": 5555}


class HostCluster:
    """atscale across hosts, configured only by the environment variables a user sets:

    - ``hub``: Redis (password, bound to its address), moto's S3 server, the replay
      search service (each image answered after ``image_delay`` seconds), later Flower;
    - ``dl1``..``dlN``: ``celery worker -Q search,download -n download@%h`` (added one by one);
    - ``gpu``: ``celery worker -Q gpu --pool threads -c 1 -n gpu0@%h``;
    - ``ops``: where a user runs ``celery call`` and the browser.
    """

    API_KEY = "sk-scale-out-2b7e15-not-real"
    REDIS_PASSWORD = "scale-out-redis-pw"
    FLOWER_AUTH = "admin:scale-out-flower-pw"
    BUCKET, PREFIX = "atscale", "scale"

    def __init__(self, workdir: str | os.PathLike, *, download_hosts: int = 3, image_delay: float = 0.4,
                 download_threads: int = 4, concurrency: int = 1, stall_seconds: float = 20,
                 sweep_interval: float = 2):
        self.workdir = Path(workdir)
        self.dl_names = [f"dl{i}" for i in range(1, download_hosts + 1)]
        self.lab = Lab(["hub", *self.dl_names, "gpu", "ops"], self.workdir)
        self.image_delay = image_delay
        self.download_threads = download_threads
        self.concurrency = concurrency
        self.stall_seconds = stall_seconds
        self.sweep_interval = sweep_interval
        self.workers: dict[str, str] = {}  # host -> node name
        self.flower_url: str | None = None
        self._store = None

    def __enter__(self) -> "HostCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def hub(self) -> Host:
        return self.lab["hub"]

    # -- configuration: the variables a user exports on every machine --------
    def cluster_env(self) -> dict:
        hub = self.hub.addr
        broker = f"redis://:{self.REDIS_PASSWORD}@{hub}:{HUB_PORTS['redis']}/0"
        return {
            "CELERY_BROKER_URL": broker, "CELERY_RESULT_BACKEND": broker,
            "SERPAPI_BASE_URL": f"http://{hub}:{HUB_PORTS['replay']}", "SERPAPI_API_KEY": self.API_KEY,
            "ATSCALE_STORE": f"s3://{self.BUCKET}/{self.PREFIX}",
            "AWS_ENDPOINT_URL_S3": f"http://{hub}:{HUB_PORTS['s3']}", "AWS_ACCESS_KEY_ID": "scale-out",
            "AWS_SECRET_ACCESS_KEY": "scale-out-secret", "AWS_DEFAULT_REGION": "us-east-1",
            "ATSCALE_ALLOWED_NETWORKS": str(self.lab.subnet),
            "ATSCALE_DOWNLOAD_THREADS": str(self.download_threads),
            "ATSCALE_STALL_SECONDS": str(self.stall_seconds), "ATSCALE_SWEEP_INTERVAL": str(self.sweep_interval),
        }

    def env(self, host: Host, **extra) -> dict:
        return clean_env({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **self.cluster_env(),
                          "ATSCALE_CACHE_DIR": str(host.workdir / "cache"), **extra})

    # -- the hub ---------------------------------------------------------------
    def start(self) -> "HostCluster":
        import sys

        from tasks.embedded import redis_server_binary

        self.lab.open()
        try:
            hub, addr = self.hub, self.hub.addr
            (hub.workdir / "redis").mkdir(exist_ok=True)
            redis_proc = hub.run([redis_server_binary(), "--bind", addr, "--port", HUB_PORTS["redis"],
                                  "--requirepass", self.REDIS_PASSWORD, "--save", "", "--appendonly", "no",
                                  "--dir", hub.workdir / "redis", "--maxmemory-policy", "noeviction"],
                                 name="redis")
            s3 = hub.run([sys.executable, "-m", "moto.server", "-H", addr, "-p", HUB_PORTS["s3"]],
                         self.env(hub), name="s3", cwd=ROOT)
            replay = hub.run([sys.executable, "-m", "workers.replay", "--host", addr, "--port", HUB_PORTS["replay"],
                              "--image-delay", self.image_delay],
                             self.env(hub, ATSCALE_REPLAY_API_KEY=self.API_KEY), name="replay", cwd=ROOT,
                             stdout=subprocess.PIPE)
            line = replay.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"replay service did not start: {hub.log('replay')[-2000:]}")
            wait_port(addr, HUB_PORTS["redis"], proc=redis_proc, what="redis")
            wait_port(addr, HUB_PORTS["s3"], proc=s3, what="moto S3 server")
        except BaseException:
            self.close()
            raise
        return self

    # -- workers -------------------------------------------------------------
    def start_download_worker(self, host_name: str) -> str:
        import sys

        host = self.lab[host_name]
        host.run([sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", "search,download",
                  "-c", self.concurrency, "-n", "download@%h", "-E", "--loglevel", "INFO"],
                 self.env(host), name="worker", cwd=ROOT)
        self.workers[host_name] = f"download@{host_name}"
        return self.workers[host_name]

    def start_gpu_worker(self, host_name: str = "gpu") -> str:
        import sys

        host = self.lab[host_name]
        host.run([sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", "gpu", "-c", "1",
                  "--pool", "threads", "-n", "gpu0@%h", "-E", "--loglevel", "INFO"],
                 self.env(host, CUDA_VISIBLE_DEVICES="0"), name="worker", cwd=ROOT)
        self.workers[host_name] = f"gpu0@{host_name}"
        return self.workers[host_name]

    def app(self):
        from celery import Celery

        if not hasattr(self, "_app"):
            self._app = Celery(broker=self.cluster_env()["CELERY_BROKER_URL"])
        return self._app

    def wait_workers(self, nodes: list[str], timeout: float = 120) -> None:
        end = time.time() + timeout
        up: set = set()
        while time.time() < end:
            try:
                replies = self.app().control.ping(timeout=1.0) or []
            except Exception:  # broker not reachable yet: bounded by timeout
                replies = []
            up = {k for r in replies for k in r}
            if set(nodes) <= up:
                return
            for host_name, node in self.workers.items():
                for n, proc in self.lab[host_name].procs:
                    if n == "worker" and proc.poll() is not None and node in nodes:
                        raise RuntimeError(f"{node} exited with {proc.returncode}: "
                                           f"{self.lab[host_name].log('worker')[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"workers {sorted(set(nodes) - up)} did not answer within {timeout:.0f}s")

    def start_flower(self) -> str:
        import sys

        hub = self.hub
        proc = hub.run([sys.executable, "-m", "celery", "-A", "tasks", "flower", f"--address={hub.addr}",
                        f"--port={HUB_PORTS['flower']}", f"--basic-auth={self.FLOWER_AUTH}"],
                       self.env(hub), name="flower", cwd=ROOT)
        wait_port(hub.addr, HUB_PORTS["flower"], timeout=90, proc=proc, what="flower")
        self.flower_url = f"http://{hub.addr}:{HUB_PORTS['flower']}"
        return self.flower_url

    def flower_get(self, path: str, timeout: float = 30):
        import requests

        with requests.Session() as s:
            s.trust_env = False  # straight to the hub: no proxy from the environment
            r = s.get(self.flower_url + path, auth=tuple(self.FLOWER_AUTH.split(":", 1)), timeout=timeout)
        r.raise_for_status()
        return r.json()

    # -- what a user does ----------------------------------------------------
    def call(self, kwargs: dict) -> str:
        """``celery -A tasks call collect_breeds --kwargs ...`` run on the ops host."""
        import json
        import sys

        ops = self.lab["ops"]
        return ops.check_output([sys.executable, "-m", "celery", "-A", "tasks", "call", "collect_breeds",
                                 "--kwargs", json.dumps(kwargs)], self.env(ops), cwd=ROOT).strip()

    @property
    def store(self):
        """The test's own view of the S3 bucket (from the operator's link)."""
        if self._store is None:
            from workers.store import S3Store

            env = self.cluster_env()
            keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
            saved = {k: os.environ.get(k) for k in keys}
            os.environ.update({k: env[k] for k in keys})  # boto3 reads them when the client is made
            try:
                self._store = S3Store(self.BUCKET, self.PREFIX, endpoint_url=env["AWS_ENDPOINT_URL_S3"])
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        return self._store

    def redis(self):
        import redis

        return redis.Redis.from_url(self.cluster_env()["CELERY_BROKER_URL"])

    def wait_state(self, dataset: str, timeout: float = 600, states=("done", "partial", "failed")) -> dict:
        end = time.time() + timeout
        st: dict = {}
        while time.time() < end:
            st = self.store.get_json_or(f"datasets/{dataset}/status.json") or {}
            if st.get("state") in states:
                return st
            time.sleep(0.5)
        raise AssertionError(f"dataset {dataset} still {st.get('state')} after {timeout:.0f}s: {st}")

    def warm_replay(self, queries: list[str], pages: int) -> int:
        """Ask the replay service once for every image of these pages, so that its first
        rendering of an image (CPU on the hub) is not paid inside any measurement."""
        from concurrent.futures import ThreadPoolExecutor

        import requests

        from workers.replay import catalog

        base = self.cluster_env()["SERPAPI_BASE_URL"]
        urls = [base + e.path for q in queries for p in range(pages) for e in catalog.page_entries(q, p)]
        with requests.Session() as s:
            s.trust_env = False
            s.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=64))
            with ThreadPoolExecutor(64) as pool:
                list(pool.map(lambda u: s.get(u, timeout=60).status_code, urls))
        return len(urls)

    # -- figures -------------------------------------------------------------
    def page_timings(self, dataset: str) -> dict:
        """From the result backend (the workers' own clocks): when the page plan was sent,
        when each page task finished and how many images it stored."""
        import json
        from datetime import datetime

        r = self.redis()

        def meta(task_id: str) -> dict:
            raw = r.get(f"celery-task-meta-{task_id}")
            if raw is None:
                raise AssertionError(f"no result for task {task_id}")
            return json.loads(raw)

        def ts(m: dict) -> float:
            return datetime.fromisoformat(m["date_done"]).timestamp()

        plan = self.store.get_json(f"datasets/{dataset}/plan.json")["pages"]
        planned = ts(meta(f"plan-{dataset}"))
        pages = {}
        for p in plan:
            m = meta(f"page-{dataset}-{p['label']}-{p['ijn']}")
            pages[f"{p['label']}/{p['ijn']}"] = {"done": ts(m), "stored": m["result"]["stored"],
                                                  "results": m["result"]["results"]}
        return {"planned": planned, "pages": pages}

    def pages_by_host(self, dataset: str) -> dict[str, int]:
        """Page tasks of ``dataset`` each download host's worker log says it finished."""
        out = {}
        for name in self.dl_names:
            log = self.lab[name].log("worker")
            out[name] = len(re.findall(rf"Task atscale\.download_page\[page-{re.escape(dataset)}-[^\]]+\] succeeded",
                                       log))
        return out

    def measure(self, dataset: str, queries: list[str], pages: int) -> dict:
        """One collection (no training) on the download hosts running now: images/s of
        the download stage (plan sent -> last page stored), and the whole run's time."""
        t0 = time.time()
        self.call({"queries": queries, "pages": pages, "dataset": dataset, "train": False})
        st = self.wait_state(dataset, timeout=900)
        wall = time.time() - t0
        if st.get("state") != "done":
            raise AssertionError(f"{dataset} ended {st.get('state')}: {st.get('reason')}")
        tm = self.page_timings(dataset)
        stored = sum(p["stored"] for p in tm["pages"].values())
        urls = sum(p["results"] for p in tm["pages"].values())
        seconds = max(p["done"] for p in tm["pages"].values()) - tm["planned"]
        return {"dataset": dataset, "hosts": sorted(n for n in self.workers if n.startswith("dl")),
                "pages": len(tm["pages"]), "images": stored, "urls": urls, "seconds": round(seconds, 2),
                "images_per_s": round(stored / seconds, 2), "run_seconds": round(wall, 2),
                "pages_by_host": self.pages_by_host(dataset), "swept": st.get("swept")}

    def close(self) -> None:
        self.lab.close()
