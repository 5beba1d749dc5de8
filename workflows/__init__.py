"""Workflows: orchestration only, replay-tested."""
