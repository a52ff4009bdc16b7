"""Registers DiffPure and its score models."""
from __future__ import annotations
