"""One folder a tab, each with its ``panel.py``; a tab imports only the base, never another tab (the registry
in gui/window/tabs.py lists them)."""
