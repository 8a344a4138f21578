"""The redis-server fixture itself: real server, data survives a restart (AOF), as the ingress tests rely on."""


def test_redis_fixture_persists_streams_across_restart(redis_server):
    r = redis_server.client()
    entry = r.xadd("filterd:in", {"text": "hello"})
    r.xgroup_create("filterd:in", "filterd", id="0")
    redis_server.restart()
    r = redis_server.client()
    assert r.xrange("filterd:in")[0][0] == entry
    assert r.xinfo_groups("filterd:in")[0]["name"] == b"filterd"
