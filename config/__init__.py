"""Configuration: one pydantic-settings object loaded at each entrypoint."""

from config.settings import SEARCH_ATTRIBUTES, Approver, Settings, load_settings, redact_url

__all__ = ["SEARCH_ATTRIBUTES", "Approver", "Settings", "load_settings", "redact_url"]
