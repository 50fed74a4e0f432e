"""Merging adapters into their base: the plan (engine, dtype, memory and disk), the streaming and in-memory engines, verification against the adapter, and the model card."""
