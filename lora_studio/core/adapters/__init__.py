"""LoRA adapter folders.

Reading their config and tensors, whether one fits a base, what one does (inspection), weighted combinations,
and training-loss logs.
"""
