"""Helpers shared by the test modules: the private Docker engine (`dockerd`) and friends."""
