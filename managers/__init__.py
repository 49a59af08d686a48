"""The domain: one package per subsystem."""
