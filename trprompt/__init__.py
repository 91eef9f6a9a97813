"""TRPrompt: query-aware prompt optimization from textual rewards."""

__version__ = "0.1.0"
