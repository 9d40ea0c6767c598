"""Helpers for the test suite: a private Docker engine and locally made test images."""
