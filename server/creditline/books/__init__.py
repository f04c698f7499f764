"""The books: CDRs, their export to SQLite or PostgreSQL, and reconciliation."""
