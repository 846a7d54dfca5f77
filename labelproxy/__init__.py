"""labelproxy: Docker labels in, TCP/UDP listeners with Prometheus metrics out."""

__version__ = "0.1.0"
