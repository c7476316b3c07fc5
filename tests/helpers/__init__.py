"""Test helpers shared across test folders (no fixtures here: plain functions and context managers)."""
