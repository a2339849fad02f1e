"""The store seam: what options need of a store, stores found by URL scheme through entry points,
and a third-party store added by installing a package and nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from celery_singleton_lock import LockConfigError
from celery_singleton_lock.backends.base import Capability
from celery_singleton_lock.backends.registry import backend_class, capabilities_of, schemes
from celery_singleton_lock.policy import check_capabilities, needed_capabilities

ALL = frozenset({Capability.TTL, Capability.ADOPTABLE, Capability.HANDOVER, Capability.FOLLOW,
                 Capability.LIMIT})


@pytest.mark.parametrize(
    ("mode", "on_duplicate", "limit", "needs"),
    [
        ("while_executing", "reject", 1, set()),
        ("while_executing", "coalesce", 1, {Capability.FOLLOW}),
        ("while_executing", "reject", 3, {Capability.LIMIT}),
        ("until_executing", "reject", 1, {Capability.ADOPTABLE}),
        ("until_executed", "reject", 1, {Capability.ADOPTABLE, Capability.HANDOVER}),
        ("until_expired", "reject", 1, {Capability.ADOPTABLE, Capability.TTL}),
    ],
)
def test_what_each_option_needs_of_its_store(mode: str, on_duplicate: str, limit: int,
                                              needs: set[str]) -> None:
    assert {c for c, _, _ in needed_capabilities(mode, on_duplicate, limit)} == needs
    check_capabilities(ALL, "a full store", mode, on_duplicate, limit)  # nothing missing
    for missing in needs:
        with pytest.raises(LockConfigError) as err:
            check_capabilities(ALL - {missing}, "zookeeper://zk:2181", mode, on_duplicate, limit)
        assert missing in str(err.value) and "zookeeper://zk:2181" in str(err.value)
        assert err.value.setting in {"lock_mode", "lock_on_duplicate", "lock_limit"}


def test_the_interface_is_importable_where_the_spec_names_it() -> None:
    from celery_singleton_lock import backends
    from celery_singleton_lock.backends import base

    assert backends.LockBackend is base.LockBackend
    assert backends.QuorumMember is base.QuorumMember
    assert backends.Capability is base.Capability


def test_the_projects_own_stores_are_registered_as_entry_points() -> None:
    names = schemes()
    for scheme in ("redis", "rediss", "unix", "redis+cluster", "redis+sentinel", "memory"):
        assert scheme in names
    assert backend_class("redis").__name__ == "RedisMember"
    assert Capability.NOTIFY in capabilities_of("redis://localhost:6379/0")
    assert Capability.QUORUM_MEMBER not in capabilities_of(["redis://a:1/0", "redis://b:1/0"])


def test_an_unknown_scheme_names_the_setting_and_the_known_schemes() -> None:
    with pytest.raises(LockConfigError) as err:
        backend_class("etcd", setting="singleton_lock_url")
    assert err.value.setting == "singleton_lock_url"
    assert "'etcd'" in str(err.value) and "redis://" in str(err.value)


def _install(site: Path, name: str, entry: str, module: str) -> None:
    """What installing a package leaves: its module and a dist-info with an entry point."""
    (site / f"{name}.py").write_text(textwrap.dedent(module))
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        f"[celery_singleton_lock.backends]\n{entry}\n")
    (info / "RECORD").write_text("")


def _run(site: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.getcwd()])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=60)


THIRD_PARTY = '''
    """A third party's store: one in-process server, a quorum member without lock_limit."""
    from celery_singleton_lock.backends.base import Capability
    from celery_singleton_lock.backends.memory import MemoryMember


    class TinyMember(MemoryMember):
        capabilities = MemoryMember.capabilities - {Capability.LIMIT}

        @classmethod
        def from_url(cls, url, *, socket_timeout=0.2, setting="singleton_lock_url"):
            return cls(url.split("://", 1)[1])
'''


def test_a_store_is_added_by_installing_a_package_with_an_entry_point(tmp_path: Path) -> None:
    _install(tmp_path, "tinystore", "tiny = tinystore:TinyMember", THIRD_PARTY)
    done = _run(tmp_path, '''
        from celery import Celery
        from celery_singleton_lock import LockConfigError, LockedTask, Redlock
        from celery_singleton_lock.backends.registry import schemes

        assert "tiny" in schemes()
        a = Redlock("job", url="tiny://one", ttl=5)
        b = Redlock("job", url="tiny://one", ttl=5)
        assert a.acquire(blocking=False) and a.fencing_token > 0
        assert not b.acquire(blocking=False)
        a.release()
        assert b.acquire(blocking=False)
        b.release()
        three = ["tiny://x", "tiny://y", "tiny://z"]  # a quorum of the third party's servers
        c = Redlock("job", url=three, ttl=5)
        assert c.acquire(blocking=False) and c.store.n_masters == 3
        c.release()

        app = Celery("plugin", set_as_current=False)
        app.conf.singleton_lock_url = "tiny://app"
        app.conf.task_always_eager = True

        @app.task(base=LockedTask, shared=False)
        def once(x):
            return x * 2

        assert once.delay(21).get() == 42
        def limited():
            return 1

        try:
            app.task(base=LockedTask, shared=False, lock_limit=2)(limited).name  # registers
        except LockConfigError as exc:
            assert exc.setting == "lock_limit", exc.setting
            print("refused:", exc)
        else:
            raise AssertionError("lock_limit accepted by a store without it")
        print("ok")
    ''')
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout
    assert "'limit'" in done.stdout and "tiny://app" in done.stdout


def test_a_store_whose_driver_is_missing_says_what_to_install(tmp_path: Path) -> None:
    _install(tmp_path, "needsdriver", "needy = needsdriver:Store",
             "import some_driver_that_is_not_installed\n")
    done = _run(tmp_path, '''
        from celery_singleton_lock import LockConfigError, Redlock
        try:
            Redlock("job", url="needy://h:1", ttl=5)
        except LockConfigError as exc:
            print("refused:", exc.setting, exc)
    ''')
    assert done.returncode == 0, done.stderr
    assert "refused: url" in done.stdout
    assert "some_driver_that_is_not_installed" in done.stdout
    assert "needsdriver:Store" in done.stdout


def test_an_entry_point_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    _install(tmp_path, "notastore", "odd = notastore:Thing", "class Thing:\n    pass\n")
    done = _run(tmp_path, '''
        from celery_singleton_lock import LockConfigError
        from celery_singleton_lock.backends.registry import backend_class
        try:
            backend_class("odd")
        except LockConfigError as exc:
            print("refused:", exc)
    ''')
    assert "refused:" in done.stdout and "not a LockBackend" in done.stdout, done.stderr
