"""Redis's own counters, read with INFO: commands per request and memory.

INFO commandstats counts a command run inside a Lua script (redis.call) like one a client
sent: one EVALSHA of the charging script shows up as 1 evalsha plus the 10-20 HGETALL,
HSET, ... it runs. So "round trips" are the calls of the commands clients send; the
commands that the server's Lua scripts call (read from store/lua/**.lua) are counted
apart, as work done inside Redis. This misclassifies a command the server would send
directly that a script also calls (none today: the server sends only EVALSHA, and
SCRIPT LOAD / CLIENT SETINFO when it loads a script or opens a connection).

Commands that open a connection (HELLO, CLIENT SETINFO, AUTH, SELECT) are a cost per
connection of the server's pool, not per request: they are counted apart too, and the
figure with them is reported beside the one without.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio import Redis

# Commands the benchmark itself sends to read the counters.
BENCH_COMMANDS = frozenset({"info", "dbsize", "memory|usage", "memory|stats"})
# Sent once per new connection by redis-py.
CONNECTION_COMMANDS = frozenset({"hello", "client", "auth", "select"})
# Sent by the server's background work, not by requests: the notification hub's blocking
# reads, the supervision sweep, the account gauge, the start-up check.
BACKGROUND_COMMANDS = frozenset({"xread", "xrange", "xrevrange", "zrangebyscore", "scan",
                                 "ping", "hsetnx", "hget"})
# (charge.lua calls redis.call by its local name, redis_call)
_SCRIPT_CALL = re.compile(r"""redis[._]p?call\(\s*['"]([A-Za-z]+)['"]""")


def script_commands() -> frozenset[str]:
    """The commands the server's Lua scripts call, lower case as INFO names them."""
    names: set[str] = set()
    lua = resources.files("creditline.store").joinpath("lua")
    for entry in [*lua.iterdir(), *lua.joinpath("charge").iterdir()]:  # charge.lua's parts
        if entry.name.endswith(".lua"):
            names.update(m.lower() for m in _SCRIPT_CALL.findall(entry.read_text("utf-8")))
    return frozenset(names)


async def command_calls(redis: Redis) -> dict[str, int]:
    """Calls per command since Redis started (INFO commandstats)."""
    stats: dict[str, Any] = await redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"])
            for name, value in stats.items() if name.startswith("cmdstat_")}


@dataclass(frozen=True, slots=True)
class RoundTrips:
    requests: int
    client_commands: int           # commands the server sent for requests: the round trips
    connection_commands: int       # commands the server sent to open connections
    background_commands: int       # notification readers, supervision sweeps, gauges
    in_script_commands: int        # commands run by the Lua scripts
    by_command: dict[str, int]     # every command's delta, for the reader to check

    @property
    def per_request(self) -> float:
        return self.client_commands / self.requests if self.requests else 0.0

    @property
    def per_request_with_connections(self) -> float:
        total = self.client_commands + self.connection_commands
        return total / self.requests if self.requests else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "round_trips": self.client_commands,
            "round_trips_per_request": round(self.per_request, 4),
            "connection_setup_commands": self.connection_commands,
            "background_commands": self.background_commands,
            "round_trips_per_request_with_connection_setup": round(
                self.per_request_with_connections, 4),
            "in_script_commands_per_request": (
                round(self.in_script_commands / self.requests, 2) if self.requests else 0.0),
            "commands_by_name": dict(sorted(self.by_command.items())),
        }


def round_trips(before: dict[str, int], after: dict[str, int], requests: int,
                in_script: frozenset[str]) -> RoundTrips:
    delta = {name: after[name] - before.get(name, 0) for name in after
             if after[name] != before.get(name, 0)}
    client = connection = background = inner = 0
    for name, count in delta.items():
        if name in in_script:
            inner += count
        elif name.split("|")[0] in CONNECTION_COMMANDS:
            connection += count
        elif name in BACKGROUND_COMMANDS:
            background += count
        elif name not in BENCH_COMMANDS:
            client += count
    return RoundTrips(requests, client, connection, background, inner, delta)


async def used_memory_bytes(redis: Redis) -> int:
    memory: dict[str, Any] = await redis.info("memory")
    return int(memory["used_memory"])
