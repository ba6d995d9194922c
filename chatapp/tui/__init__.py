"""The Textual TUI (`smollchat`). Imports only the chat layer and torch-free engine types."""
