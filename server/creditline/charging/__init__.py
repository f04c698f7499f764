"""Charging: the rating of requests (plans, tariffs, price schedules) and the kernels that
compute it; no gRPC, no Redis."""
