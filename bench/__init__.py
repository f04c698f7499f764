"""The Creditline benchmark: a do-nothing baseline server, an asyncio load driver, the one
command that runs them all (`python -m bench.run`), and a Locust user. See bench/README.md."""
