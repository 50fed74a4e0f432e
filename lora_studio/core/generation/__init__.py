"""Generating text from the session's model, streamed token by token, and the prompt lists that feed it."""
