"""Shared fixtures for every tier. Tier-specific fixtures live in each tier's conftest."""
