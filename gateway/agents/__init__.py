"""Agents shipped with the core (more arrive as plugins in the ``gateway.agents`` group)."""
