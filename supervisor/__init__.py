"""supervise: a process supervisor for network servers that upgrades without dropping a connection."""

__version__ = "0.1.0"
