"""Shared fixtures for every tier. Tier-specific fixtures live in each tier's conftest."""

from tests.tlsfixtures import fleet, other_fleet

__all__ = ["fleet", "other_fleet"]
