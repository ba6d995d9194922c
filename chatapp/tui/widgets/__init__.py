"""Widgets of the chat screen, each with its own scoped DEFAULT_CSS."""
