"""The inspect report: a base model and its adapters described together from file headers, without loading weights."""
