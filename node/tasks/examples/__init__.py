"""Example tasks beyond the built-in ``gpt``, documented in docs/tasks.md."""
