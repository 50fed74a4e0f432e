"""The window's docks: the base model (pick, estimate, load), the live memory chart, and the log."""
