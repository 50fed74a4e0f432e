"""The Compare tab: variants side by side on the same prompts, divergence, chat, and the shared report."""
