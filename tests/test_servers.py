"""The test-server fixtures themselves: start, stop, fault injection, cluster, auth, TLS."""

from __future__ import annotations

import os
import time

import pytest
import redis

from tests.servers import (
    RedisCluster,
    RedisServer,
    RedisTLSUnsupported,
    StoreTarget,
    find_redis_server,
    free_port,
    no_retry,
    wait_until,
)

SHARED_REDIS_PORT = 6379


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_find_redis_server_returns_an_executable() -> None:
    path = find_redis_server()
    assert os.access(path, os.X_OK)
    assert find_redis_server() is path  # cached


def test_free_port_is_bindable_and_not_the_shared_redis() -> None:
    port = free_port()
    assert port != SHARED_REDIS_PORT
    bus_port = free_port(cluster_bus=True)
    assert bus_port + 10000 <= 65535


def test_server_answers_ping_and_is_gone_after_stop() -> None:
    server = RedisServer().start()
    try:
        pid = server.pid
        assert pid is not None
        assert server.port != SHARED_REDIS_PORT
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        with server.client() as client:
            assert client.ping() is True
        server.stop()
        assert not server.is_running()
        assert server.pid is None
        assert _process_gone(pid)
        with server.client(socket_connect_timeout=0.5, retry=no_retry()) as client:
            with pytest.raises(redis.ConnectionError):
                client.ping()
    finally:
        server.close()


def test_pause_makes_requests_time_out_and_resume_restores_them(
    redis_server: RedisServer,
) -> None:
    with redis_server.client(socket_timeout=0.2, retry=no_retry()) as client:
        client.set("k", "v")
        redis_server.pause()
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.get("k")
        assert time.monotonic() - started < 2
        redis_server.resume()
        assert client.get("k") == b"v"


def test_stop_terminates_a_paused_server() -> None:
    server = RedisServer().start()
    pid = server.pid
    assert pid is not None
    server.pause()
    server.close()
    assert _process_gone(pid)


def test_restart_keeps_the_address_and_empties_data_and_script_cache(
    redis_server: RedisServer,
) -> None:
    port = redis_server.port
    with redis_server.client() as client:
        sha = client.script_load("return 1")
        client.set("k", "v")
        assert client.script_exists(sha) == [True]
    redis_server.restart()
    assert redis_server.port == port
    with redis_server.client() as client:
        assert client.script_exists(sha) == [False]
        assert client.get("k") is None


def test_module_server_is_flushed_between_tests_first(redis_server_module: RedisServer) -> None:
    with redis_server_module.client() as client:
        assert client.dbsize() == 0
        client.set("left-behind", "1")
    redis_server_module.pause()  # the next test must still get a working server


def test_module_server_is_flushed_between_tests_second(redis_server_module: RedisServer) -> None:
    with redis_server_module.client(socket_timeout=2) as client:
        assert client.dbsize() == 0


def test_redis_masters_are_independent_servers(redis_masters) -> None:
    masters = redis_masters(3)
    assert len({m.port for m in masters}) == 3
    with masters[0].client() as first, masters[1].client() as second:
        first.set("k", "1")
        assert second.get("k") is None


def test_unix_socket_server(redis_masters) -> None:
    (server,) = redis_masters(1, unix=True)
    assert server.host is None and server.port is None
    assert server.url.startswith("unix:///") and server.url.endswith("redis.sock?db=0")
    with server.client() as client:
        assert client.ping() is True


def test_password_server_refuses_anonymous_clients_and_accepts_its_url(redis_masters) -> None:
    (server,) = redis_masters(1, password="s3cret/pw")
    assert "s3cret%2Fpw@" in server.url
    anonymous = redis.Redis(host=server.host, port=server.port, retry=no_retry())
    with anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with redis.Redis.from_url(server.url) as client:
        assert client.ping() is True


def test_acl_user_server_refuses_default_user(redis_masters) -> None:
    (server,) = redis_masters(1, username="locker", password="pw")
    assert server.url.startswith("redis://locker:pw@127.0.0.1:")
    anonymous = redis.Redis(host=server.host, port=server.port, retry=no_retry())
    with anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with redis.Redis.from_url(server.url) as client:
        assert client.acl_whoami() == "locker"


def test_tls_server_works_through_its_rediss_url() -> None:
    server = RedisServer(tls=True)
    try:
        try:
            server.start()
        except RedisTLSUnsupported as exc:
            pytest.skip(f"redis-server built without TLS: {exc}")
        assert server.url.startswith("rediss://127.0.0.1:")
        assert server.ca_path is not None
        with redis.Redis.from_url(server.url, ssl_ca_certs=server.ca_path) as client:
            assert client.ping() is True
        plain = redis.Redis(host=server.host, port=server.port, socket_timeout=1, retry=no_retry())
        with plain, pytest.raises(redis.ConnectionError):
            plain.ping()
    finally:
        server.close()


def test_cluster_routes_keys_to_different_nodes_and_tags_together(
    redis_cluster: RedisCluster,
) -> None:
    assert redis_cluster.url == f"redis+cluster://127.0.0.1:{redis_cluster.nodes[0].port}"
    keys = [f"key-{i}" for i in range(30)]
    with redis_cluster.client() as client:
        for key in keys:
            client.set(key, "1")
        client.set("{job}:a", "1")
        client.set("{job}:b", "1")
    counts = []
    for node in redis_cluster.nodes:
        with node.client() as conn:
            counts.append(conn.dbsize())
    assert sum(counts) == len(keys) + 2
    assert all(count > 0 for count in counts)
    owner = redis_cluster.node_for_key("{job}:a")
    assert owner is redis_cluster.node_for_key("{job}:b")
    with owner.client() as conn:
        assert conn.exists("{job}:a", "{job}:b") == 2


def test_cluster_heals_after_a_node_restart(redis_cluster: RedisCluster) -> None:
    redis_cluster.nodes[1].restart()
    redis_cluster.wait_ok()
    with redis_cluster.client() as client:
        for i in range(10):
            client.set(f"after-restart-{i}", "1")


def test_store_url_forms_and_flush(store_url: StoreTarget) -> None:
    expected_kind = {"single": "single", "redlock3": "redlock", "redlock5": "redlock"}
    assert store_url.kind == expected_kind.get(store_url.id, "cluster")
    if store_url.kind == "single":
        assert isinstance(store_url.url, str) and store_url.url.startswith("redis://")
    elif store_url.kind == "redlock":
        assert isinstance(store_url.url, list)
        assert len(store_url.url) == len(store_url.servers) == int(store_url.id[-1])
    else:
        assert isinstance(store_url.url, str) and store_url.url.startswith("redis+cluster://")
    for server in store_url.servers:
        assert server.port != SHARED_REDIS_PORT
        with server.client() as client:
            assert client.dbsize() == 0
    if store_url.cluster is not None:
        with store_url.cluster.client() as cluster_client:
            cluster_client.mset_nonatomic({f"dirty-{i}": "1" for i in range(10)})
    else:
        for server in store_url.servers:
            with server.client() as client:
                client.set("dirty", "1")
    store_url.flush()
    for server in store_url.servers:
        with server.client() as client:
            assert client.dbsize() == 0


def test_store_url_is_healed_after_fault_injection(store_url: StoreTarget) -> None:
    store_url.servers[0].stop()
    if len(store_url.servers) > 1:
        store_url.servers[-1].pause()
    store_url.heal()
    for server in store_url.servers:
        with server.client(socket_timeout=2) as client:
            wait_until(client.ping, 5, message=f"PING {server!r}")
