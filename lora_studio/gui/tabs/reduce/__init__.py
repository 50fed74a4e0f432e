"""The Reduce tab: an adapter cut to a lower rank, what the cut keeps and what it costs."""
