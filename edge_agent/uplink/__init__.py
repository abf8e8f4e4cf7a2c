"""Uplinks: move the durable outbox to the MES and bring MES commands in."""
