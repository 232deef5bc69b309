"""The redis component against a real Redis: exact round trips (types, values, TTLs, binary
names), all-or-nothing live restores, scratch drills that check and clean up.

Every test works in database 13 of REDIS_URL's server, emptied before and after; databases 0
and 1 (Bridge's cache and broker) are never touched.
"""

from __future__ import annotations

import io
import os
import time
from urllib.parse import urlsplit, urlunsplit

import pytest

from backups.components import ComponentError, Destination, RestoreRefused
from backups.components import redis as component
from tests.conftest import need

REDIS_URL = os.environ.get("REDIS_URL", "")
TEST_DB = 13
HOUR_MS = 3_600_000
BINARY_KEY = b"\xff\x00bin\xfe:key"


@pytest.fixture
def server(settings):
    need(bool(REDIS_URL), "needs Redis (set REDIS_URL)")
    import redis

    url = urlunsplit(urlsplit(REDIS_URL)._replace(path=f"/{TEST_DB}"))
    settings.REDIS_URL = url
    settings.BACKUP_REDIS_URL = url
    client = redis.Redis.from_url(url, protocol=2)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def handler():
    return component.RedisHandler()


@pytest.fixture
def unit(handler, server):
    units = handler.units()
    assert isinstance(units, list)
    return units[0]


def populate(client) -> None:
    client.set("string", "plain value")
    client.set("counter", 42)
    client.set(BINARY_KEY, b"\x00\x01\x02\xff")
    client.set("session", "expires", px=HOUR_MS)
    client.hset("hash", mapping={"a": "1", "b": "2", b"\xfe": b"\x00"})
    client.rpush("list", "x", "y", "z", "x")
    client.sadd("set", "one", "two", "three")
    client.zadd("zset", {"low": -1.25, "mid": 0.1, "high": float("inf")})
    client.xadd("stream", {"field": "1", "other": "2"}, id="1-1")
    client.xadd("stream", {"field": "3"}, id="2-0")
    client.xgroup_create("stream", "workers", id="0")
    client.xreadgroup("workers", "alice", {"stream": ">"}, count=1)
    # Large enough for hashtable encodings, whose DUMP payloads differ after a round trip.
    client.sadd("big-set", *[f"member-{i}" for i in range(3000)])
    client.hset("big-hash", mapping={f"field-{i}": i for i in range(3000)})
    client.expire("big-hash", 2 * 3600)


def state(client) -> dict:
    """Every key's type, value and absolute expiry, as Redis reports them."""
    found = {}
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"string":
            value = client.get(key)
        elif kind == b"hash":
            value = client.hgetall(key)
        elif kind == b"list":
            value = client.lrange(key, 0, -1)
        elif kind == b"set":
            value = client.smembers(key)
        elif kind == b"zset":
            value = client.zrange(key, 0, -1, withscores=True)
        else:
            groups = [
                (group["name"], group["pending"], group["last-delivered-id"])
                for group in client.xinfo_groups(key)
            ]
            pending = [
                (entry["message_id"], entry["consumer"], entry["times_delivered"])
                for group in client.xinfo_groups(key)
                for entry in client.xpending_range(key, group["name"], "-", "+", 100)
            ]
            value = (client.xrange(key), groups, pending)
        found[key] = (kind, value, client.pexpiretime(key))
    return found


def take(handler, unit) -> tuple[dict, bytes]:
    out = io.BytesIO()
    manifest = handler.backup(unit, out, parent=None, on_bytes=lambda count: None)
    return manifest, out.getvalue()


def put_back(handler, unit, manifest, data, destination=None):
    return handler.restore(
        unit,
        [manifest],
        [lambda: io.BytesIO(data)],
        destination=destination or Destination(live=True),
        on_bytes=lambda count: None,
    )


def own_keys(client) -> list[bytes]:
    return [
        key
        for key in client.scan_iter(count=1000)
        if key.startswith((component.DRILL_PREFIX, component.STAGING_PREFIX))
    ]


def test_an_unset_redis_url_is_reported_skipped_with_its_reason(settings, handler):
    settings.REDIS_URL = ""
    settings.BACKUP_REDIS_URL = ""
    assert handler.units() == "REDIS_URL (BACKUP_REDIS_URL) is not set"


def test_the_manifest_counts_keys_and_types(server, handler, unit):
    populate(server)
    manifest, _ = take(handler, unit)
    assert manifest["keys"] == 11
    assert manifest["types"] == {
        "hash": 2,
        "list": 1,
        "set": 2,
        "stream": 1,
        "string": 4,
        "zset": 1,
    }
    assert manifest["expiring"] == 2
    assert manifest["redis_version"]
    assert manifest["db"] == TEST_DB
    assert len(manifest["digest"]) == 64


def test_a_live_restore_brings_back_every_key_type_value_and_ttl_exactly(server, handler, unit):
    # given a keyspace of every type, with and without TTLs, binary names, and more keys than
    # one batch
    populate(server)
    server.mset({f"filler:{i}": i for i in range(1200)})
    before = state(server)
    manifest, data = take(handler, unit)
    # when it changes after the backup
    server.set("string", "changed")
    server.delete("hash", BINARY_KEY)
    server.persist("session")
    server.expire("list", 5)
    server.set("added-later", "must go")
    server.xadd("stream", {"field": "later"})
    result = put_back(handler, unit, manifest, data)
    # then the restore is exact
    after = state(server)
    assert set(after) == set(before)
    assert b"added-later" not in after
    for key, (kind, value, expiry) in before.items():
        assert after[key][0] == kind, key
        assert after[key][1] == value, key
        if expiry < 0:
            assert after[key][2] == -1, f"{key!r} must stay persistent"
        else:
            assert abs(after[key][2] - expiry) <= 1000, key
    assert server.pttl("string") == -1
    assert 0 < server.pttl("session") <= HOUR_MS
    assert result["keys"] == len(before)
    assert own_keys(server) == []


def test_keys_whose_expiry_passed_are_not_restored(server, handler, unit):
    server.set("short", "lived", px=300)
    server.set("long", "lived", px=HOUR_MS)
    manifest, data = take(handler, unit)
    time.sleep(0.5)
    result = put_back(handler, unit, manifest, data)
    assert server.exists("short") == 0
    assert server.get("long") == b"lived"
    assert result["expired"] == 1


@pytest.mark.parametrize("cut", [10, 0.3, 0.7, -20, -1])
def test_a_truncated_stream_changes_nothing(server, handler, unit, cut):
    populate(server)
    manifest, data = take(handler, unit)
    server.set("string", "written after the backup")
    server.set("added-later", "stays")
    before = state(server)
    end = int(len(data) * cut) if isinstance(cut, float) else cut
    with pytest.raises(ComponentError, match=r"truncated|do not add up|malformed"):
        put_back(handler, unit, manifest, data[:end])
    assert state(server) == before
    assert own_keys(server) == []


def test_an_artifact_that_is_not_the_manifests_is_refused_and_changes_nothing(
    server, handler, unit
):
    server.set("a", "1")
    manifest, _ = take(handler, unit)
    server.set("b", "2")
    _, other = take(handler, unit)
    before = state(server)
    with pytest.raises(ComponentError, match="does not match its manifest"):
        put_back(handler, unit, manifest, other)
    assert state(server) == before
    assert own_keys(server) == []


def test_a_snapshot_from_a_newer_redis_is_refused_before_anything_changes(server, handler, unit):
    server.set("a", "1")
    manifest, data = take(handler, unit)
    server.set("a", "2")
    with pytest.raises(RestoreRefused, match="too old"):
        put_back(handler, unit, {**manifest, "redis_version": "99.0.0"}, data)
    assert server.get("a") == b"2"


def test_a_scratch_restore_checks_out_leaves_live_keys_alone_and_is_discarded(
    server, handler, unit, tmp_path
):
    # given a backup, and live keys that changed since
    populate(server)
    manifest, data = take(handler, unit)
    server.set("string", "live value")
    server.set("live-only", "x")
    live = state(server)
    drill = Destination(live=False, scratch_dir=tmp_path, tag="drill-1")
    # when it is restored into scratch and checked
    restored = put_back(handler, unit, manifest, data, drill)
    drill_keys = own_keys(server)
    checked = handler.check(unit, manifest, destination=drill)
    # then every check passes, the drill keys carry their TTLs, the live keys are untouched
    assert restored["keys"] == manifest["keys"]
    assert checked["ok"], checked
    assert {item["name"] for item in checked["checks"]} >= {"keys", "types"}
    assert server.pexpiretime(b"bridge-drill:drill-1:session") == server.pexpiretime("session")
    assert server.pttl(b"bridge-drill:drill-1:string") == -1
    assert b"bridge-drill:drill-1:" + BINARY_KEY in drill_keys
    assert {key: value for key, value in state(server).items() if key in live} == live
    # and discard leaves no drill key behind
    handler.discard(unit, destination=drill)
    assert own_keys(server) == []
    assert state(server) == live


def test_the_check_notices_a_drill_key_that_differs(server, handler, unit, tmp_path):
    populate(server)
    manifest, data = take(handler, unit)
    drill = Destination(live=False, scratch_dir=tmp_path, tag="drill-2")
    put_back(handler, unit, manifest, data, drill)
    server.sadd(b"bridge-drill:drill-2:big-set", "intruder")
    server.persist(b"bridge-drill:drill-2:session")
    checked = handler.check(unit, manifest, destination=drill)
    failed = {item["name"] for item in checked["checks"] if not item["ok"]}
    assert not checked["ok"]
    assert "keys with a TTL" in failed
    assert any(name.startswith("digest") for name in failed)
    handler.discard(unit, destination=drill)
    assert own_keys(server) == []


def test_keys_expiring_during_a_drill_are_counted_not_restored(server, handler, unit, tmp_path):
    server.set("soon", "gone", px=60_000)
    server.set("later", "kept", px=HOUR_MS)
    manifest, data = take(handler, unit)
    drill = Destination(live=False, scratch_dir=tmp_path, tag="drill-3")
    restored = put_back(handler, unit, manifest, data, drill)
    assert restored["expiring_soon_not_restored"] == 1
    assert server.exists(b"bridge-drill:drill-3:soon") == 0
    assert handler.check(unit, manifest, destination=drill)["ok"]
    handler.discard(unit, destination=drill)


def test_a_key_gone_between_scan_and_dump_is_skipped(server):
    server.set("present", "1")
    client = component._client(component.redis_url(), timeout=5)
    try:
        records, vanished = component.read_keys(client, [b"present", b"gone"], exact=True)
    finally:
        client.close()
    assert [record.key for record in records] == [b"present"]
    assert vanished == 1


def test_drill_and_staging_keys_are_never_backed_up(server, handler, unit):
    server.set("real", "1")
    server.set(b"bridge-drill:old:real", "1")
    server.set(b"bridge-restore:abc:real", "1")
    manifest, _ = take(handler, unit)
    assert manifest["keys"] == 1
