"""docker-compose.yml cannot run here (no Docker engine): check what can be checked,
that it parses and that every service's command matches the app's queues and entry points."""
from pathlib import Path

import yaml

from tasks.celery import QUEUES, app

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def celery_services():
    return {name: svc["command"] for name, svc in SERVICES.items()
            if isinstance(svc.get("command"), list) and svc["command"][:1] == ["celery"]}


def test_expected_services_exist():
    assert {"redis", "minio", "minio-init", "worker", "gpu-worker", "flower"} <= set(SERVICES)


def test_every_celery_command_names_the_app_and_real_queues():
    served = set()
    for name, cmd in celery_services().items():
        assert cmd[1:3] == ["-A", "tasks"], name
        assert cmd[3] in ("worker", "flower"), name
        if cmd[3] == "worker":
            queues = cmd[cmd.index("-Q") + 1].split(",")
            assert set(queues) <= set(QUEUES), (name, queues)
            served |= set(queues)
    assert served == set(QUEUES)  # every queue has a consumer


def test_gpu_worker_is_pinned_and_runs_one_task():
    svc = SERVICES["gpu-worker"]
    cmd = svc["command"]
    assert cmd[cmd.index("-Q") + 1] == "gpu"
    assert cmd[cmd.index("-c") + 1] == "1"
    assert cmd[cmd.index("--pool") + 1] == "threads"  # heartbeats go on while it trains
    dev = svc["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
    assert svc["environment"]["CUDA_VISIBLE_DEVICES"] == dev["device_ids"][0]


def test_entry_task_is_registered_under_its_exact_name():
    app.loader.import_default_modules()  # registers the tasks of every module in `include`

    assert "collect_breeds" in app.tasks
    for route in app.conf.task_routes:
        assert route in app.tasks, route


def test_safe_defaults():
    redis_cmd = " ".join(SERVICES["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--requirepass" in redis_cmd
    assert "noeviction" in redis_cmd
    flower = " ".join(SERVICES["flower"]["command"])
    assert "--basic-auth=" in flower
    for name, svc in SERVICES.items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    assert "MINIO_ROOT_PASSWORD" in SERVICES["minio"]["environment"]
    assert "change-me" not in (ROOT / "docker-compose.yml").read_text()


def test_worker_env_points_at_minio_and_redis():
    env = SERVICES["worker"]["environment"]
    assert env["ATSCALE_STORE"].startswith("s3://")
    assert env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert env["CELERY_BROKER_URL"].startswith("redis://") and "@redis:6379" in env["CELERY_BROKER_URL"]
