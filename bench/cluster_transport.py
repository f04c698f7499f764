"""The lean path against redis-py on a Redis Cluster, in one run (issue 16: whether the
charging EVALSHA on a cluster pays to go through the lean pipelined client).

    python -m bench.cluster_transport [--masters 3] [--sessions 2000] [--rounds 5]
                                      [--in-flight 50]

Starts a local cluster of --masters masters (tests/cluster.py: all masters, no replicas)
and runs bench/script_cost.py's charging flows (Initial, 3 Updates, Terminate, one event)
against it through the server's own Store twice: on the transport the settings choose for
a cluster (creditline.api.app.transport_for: the lean LeanCluster) and with
redis_fast_path off (redis-py's RedisCluster), alternating in each round as
bench/lean_secure.py does. Per run: charging requests/s, this process's CPU per request
and the nodes' CPU per request (summed), and the ratios to redis-py of the same round.
Claims are apart on a cluster (claim.lua before an Initial, after a Terminate): both runs
make the same calls.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from creditline.settings import Settings

from bench.lean_secure import Variant, run_rounds
from bench.script_cost import FLOWS_AT_ONCE
from tests.cluster import RedisCluster


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster_transport",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--masters", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=2_000,
                        help="charging flows per run (6 requests each)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--in-flight", type=int, default=FLOWS_AT_ONCE, help="flows at once")
    args = parser.parse_args()
    import uvloop

    with RedisCluster(masters=args.masters) as cluster:
        base = Settings(redis_url=cluster.url, redis_cluster=True, redis_call_timeout_s=60)
        nodes = tuple(cluster.nodes)
        # redis-py's cluster pool raises MaxConnectionsError when full (it does not wait):
        # a connection per flow in flight, on every node
        redis_py = replace(base, redis_fast_path=False,
                           redis_max_connections=max(base.redis_max_connections,
                                                     2 * args.in_flight))
        variants = [Variant("redis-py cluster", cluster.url, redis_py, nodes),
                    Variant("lean cluster", cluster.url, base, nodes)]
        uvloop.run(run_rounds(variants, args.sessions, args.rounds, args.in_flight))


if __name__ == "__main__":
    main()
