"""The Evaluate tab: variants scored on datasets, per set and per example, and the scale sweep."""
