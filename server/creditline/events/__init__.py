"""The event hub: charge notifications read from the partitions' Redis streams and fanned out
to subscribers."""
