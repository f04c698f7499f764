"""The tests' and the embedded redis-servers start on ports no other process holds: a
Redis answering on the port chosen is taken for ours only when its process id is ours
(another run's Redis, e.g. a Redis 6.2 of a suite running beside this one, was once taken
for ours and every FCALL test of the session failed)."""

from __future__ import annotations

import pytest
from creditline.store.redis_process import PortTakenError, RedisProcess
from redis import Redis


def test_a_port_another_redis_holds_is_refused_not_taken_for_ours() -> None:
    with RedisProcess() as other:
        taken = RedisProcess(port=other.port)
        with pytest.raises(PortTakenError, match=f"port {other.port}"):
            taken.start()
        taken.stop()


def test_the_redis_started_is_the_one_answering() -> None:
    with RedisProcess() as process:
        info = Redis.from_url(process.url).info("server")
        assert info["process_id"] == process.pid
