"""Diameter Gy/Ro (RFC 6733, RFC 4006/8506, 3GPP TS 32.299) in front of the charging core."""
