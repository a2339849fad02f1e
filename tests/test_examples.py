"""The examples and the container topology, run as a user would run them.

Each example under ``examples/`` is run as ``python examples/<name>.py`` in a subprocess; it
starts its own ``redis-server`` processes and Celery workers, makes its own checks and exits
non-zero if one fails, so these tests assert the exit code and the evidence it prints. The
environment is cleared of ``REDIS_URL``/``SINGLETON_LOCK_URL``, so no example reaches a shared
Redis, except where a test hands it servers of its own.

``docker-compose.yml`` cannot be run here (no container engine), so it is checked against the
Compose specification's JSON schema (``check-jsonschema --builtin-schema vendor.compose-spec``),
and for what the schema cannot know: the services, the image built from this repository, the
beat scheduler and the app module the commands name.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tests.servers import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
COMPOSE = ROOT / "docker-compose.yml"
LOCKED_SCHEDULER = "celery_singleton_lock.beat:LockedScheduler"


def example_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "SINGLETON_LOCK_URL") and not k.startswith("CSL_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_example(argv: Sequence[str], timeout_s: float, **env: str) -> str:
    """Run ``python <argv>`` from the repository root; returns its output, asserts exit 0."""
    proc = subprocess.Popen(
        [sys.executable, *argv], cwd=ROOT, env=example_env(**env), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the example stops what it started
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"{argv[0]} ran longer than {timeout_s}s:\n{out}")
    assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}:\n{out}"
    assert "FAIL" not in out and "all checks passed" in out, out
    return out


def passed(out: str, what: str) -> None:
    assert re.search(r"\[ok  \] " + re.escape(what), out), f"no passed check {what!r}:\n{out}"


# -- docker-compose.yml ---------------------------------------------------------------------------


def compose_schema_errors(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(path)], capture_output=True, text=True, timeout=60, check=False,
    )


def test_compose_file_passes_the_compose_spec_schema() -> None:
    done = compose_schema_errors(COMPOSE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_schema_check_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["worker-1"]["depends_on"]["broker"]["condition"] = "sometimes"
    broken["services"]["beat-1"]["comand"] = broken["services"]["beat-1"].pop("command")
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    done = compose_schema_errors(path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "sometimes" in done.stdout and "comand" in done.stdout, done.stdout


def _services() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())["services"]  # type: ignore[no-any-return]


def test_compose_runs_three_masters_a_broker_two_workers_two_beats_and_flower() -> None:
    services = _services()
    expected = {"redis-1", "redis-2", "redis-3", "broker", "worker-1", "worker-2", "beat-1",
                "beat-2", "flower"}
    assert expected <= set(services), sorted(services)
    for name in ("redis-1", "redis-2", "redis-3", "broker"):
        assert services[name]["image"].startswith("redis:"), services[name]
        assert services[name]["command"][0] == "redis-server"
    app_services = [name for name in expected if name.split("-")[0] in ("worker", "beat",
                                                                         "flower")]
    for name in app_services:
        service = services[name]
        assert service["build"]["context"] == ".", (name, service)
        assert (ROOT / service["build"]["dockerfile"]).is_file(), (name, service)
        command = service["command"]
        assert command[:3] == ["celery", "-A", "cluster"], (name, command)
        env = service["environment"]
        masters = env["SINGLETON_LOCK_URL"].split(",")
        assert [m.split("//")[1].split(":")[0] for m in masters] == [
            "redis-1", "redis-2", "redis-3"], env
        assert env["REDIS_URL"].startswith("redis://broker:"), env
        assert {"broker", "redis-1", "redis-2", "redis-3"} <= set(service["depends_on"])
    for name in ("worker-1", "worker-2"):
        assert services[name]["command"][3] == "worker"
    hostnames = {services[n]["command"][services[n]["command"].index("-n") + 1]
                 for n in ("worker-1", "worker-2")}
    assert len(hostnames) == 2, hostnames
    for name in ("beat-1", "beat-2"):
        command = services[name]["command"]
        assert command[3] == "beat"
        assert command[command.index("-S") + 1] == LOCKED_SCHEDULER, command
    flower = services["flower"]["command"]
    assert flower[3] == "flower" and "--conf=flowerconfig.py" in flower, flower


def test_the_image_holds_the_app_module_and_flower_config_the_commands_name() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    lines = [line.split(None, 1) for line in dockerfile.splitlines()
             if line.strip() and not line.startswith("#")]
    workdirs = [rest.strip() for word, *rest in lines if word == "WORKDIR" for rest in rest]
    copies = [rest[0].split() for word, *rest in lines if word == "COPY"]
    assert workdirs[-1] == "/app/examples", workdirs
    assert ["examples", "./examples"] in copies, copies
    assert ["celery_singleton_lock", "./celery_singleton_lock"] in copies, copies
    # flowerconfig.py registers the Prometheus collector: the image needs both.
    installs = [rest[0] for word, *rest in lines if word == "RUN" and "pip install" in rest[0]]
    assert any('".[prometheus]"' in i and "flower" in i for i in installs), installs
    assert (EXAMPLES / "cluster.py").is_file() and (EXAMPLES / "flowerconfig.py").is_file()
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert ".git" in ignored and "examples" not in ignored


# -- the examples -------------------------------------------------------------------------------


@pytest.mark.slow
def test_redlock_example_over_three_masters_it_starts() -> None:
    out = run_example(["examples/redlock.py"], 60)
    assert "private redis-server processes" in out, out
    for what in ("the lock outlives its 1 s ttl inside the with block",
                 "a second lock object cannot take the held key",
                 "the fencing token grew with the new acquisition",
                 "a plain acquire() is not renewed",
                 "the stale holder's release() returns False"):
        passed(out, what)


@pytest.mark.slow
def test_redlock_example_uses_the_masters_in_singleton_lock_url(
    redis_masters: Callable[..., list[RedisServer]],
) -> None:
    masters = redis_masters(3)
    out = run_example(["examples/redlock.py"], 60,
                      SINGLETON_LOCK_URL=",".join(m.url for m in masters))
    assert "the servers you gave" in out, out
    for master in masters:  # the fencing counter the example's locks left behind
        with master.client() as client:
            assert list(client.scan_iter(match="csl:{reports:daily:*}:fence")), master.url


@pytest.mark.slow
def test_fencing_example_refuses_the_paused_holders_write() -> None:
    out = run_example(["examples/fencing.py"], 120)
    passed(out, "the paused, stale holder's write is refused: token")
    passed(out, "the row keeps the new holder's value")
    assert re.search(r"worker A resumed and wrote with its old token \d+: 0 rows updated", out)


@pytest.mark.slow
def test_ha_beat_example_fails_over_within_the_beat_ttl() -> None:
    out = run_example(["examples/ha_beat.py"], 120)
    for what in ("only the leader sends while both run",
                 "beat-2 leads within singleton_lock_beat_ttl of the kill",
                 "no tick sent twice for one due time"):
        passed(out, what)


@pytest.mark.slow
def test_cluster_example_shows_duplicates_a_leading_beat_and_worker_locks() -> None:
    out = run_example(["examples/cluster.py", "--duration", "6"], 180)
    for what in ("duplicates rejected",
                 "one beat led all along, the other stood by",
                 "a worker reports its locks in celery inspect stats (singleton_locks)",
                 "a worker reports its locks in Flower /api/workers (singleton_locks)",
                 "beat ticks that came during a run were rejected as duplicates",
                 "no tick was sent by both beats",
                 "Flower's /metrics has the celery_singleton_lock_ series"):
        passed(out, what)
    assert "celery_singleton_lock_locks_held" in out, out


def test_cluster_example_rejects_a_bad_duration() -> None:
    done = subprocess.run([sys.executable, "examples/cluster.py", "--duration", "0"], cwd=ROOT,
                          env=example_env(), capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2 and "--duration must be > 0" in done.stderr, done.stderr


@pytest.mark.slow
def test_ctrl_c_stops_every_process_an_example_started() -> None:
    proc = subprocess.Popen(
        [sys.executable, "examples/ha_beat.py"], cwd=ROOT, env=example_env(),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # bounded by the test timeout; ha_beat prints within seconds
            lines.append(line)
            if "stands by" in line:
                break
        started = psutil.Process(proc.pid).children(recursive=True)
        names = sorted({p.name() for p in started})
        assert len(started) >= 6, names  # 4 redis-servers, 2 beats
        os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the foreground group
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, "".join(lines) + out
    assert "interrupted: everything started was stopped" in out, out
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive, [(p.pid, p.name()) for p in alive]


@pytest.mark.slow
def test_django_example_migrates_deduplicates_and_one_database_beat_leads() -> None:
    out = run_example(["examples/django_project/run.py"], 180)
    for what in ("manage.py migrate",
                 "the worker deduplicates: one ran, the others were rejected: 1 ran, 2 rejected",
                 "two beats run and one leads",
                 "the standby sends nothing",
                 "the periodic task from the database runs"):
        passed(out, what)


def test_an_example_whose_lock_store_is_down_fails_without_showing_the_password() -> None:
    password = "ex4mple-s3cret"
    dead = f"redis://:{password}@127.0.0.1:{free_port()}/0"
    done = subprocess.run([sys.executable, "examples/redlock.py"], cwd=ROOT,
                          env=example_env(SINGLETON_LOCK_URL=dead), capture_output=True,
                          text=True, timeout=60, check=False)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "error: LockBackendError: cannot lock" in out and "127.0.0.1" in out, out
    assert "Traceback" not in out, out
    assert password not in out, out


@pytest.mark.slow
def test_fencing_example_uses_the_redis_in_redis_url_and_never_shows_its_password() -> None:
    password = "fence-pw-9Qx"
    with RedisServer(password=password) as server:
        out = run_example(["examples/fencing.py"], 120, REDIS_URL=server.url)
        assert "the servers you gave" in out, out
        passed(out, "the paused, stale holder's write is refused")
        assert password not in out, out
        with server.client() as client:  # the lock store was this server too
            assert list(client.scan_iter(match="csl:fencing.set_balance:*:fence")), out
