"""Turning a thread, its notes, its files and a token budget into the messages sent to a model."""
