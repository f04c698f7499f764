"""Redis: the key scheme, the contract with the Lua scripts (lua/), the transports and the
embedded redis-server."""
