"""Screens: the chat screen (main), models, help, and modal dialogs."""
