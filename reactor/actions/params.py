"""Old import path of the parameter helpers, kept working: ``from reactor import ActionParams``."""

from reactor.plugins.api import ActionParams, Duration

__all__ = ["ActionParams", "Duration"]
