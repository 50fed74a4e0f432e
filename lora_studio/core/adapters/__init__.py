"""LoRA adapter folders: reading their config and tensors, whether one fits a base, what one does (inspection), weighted combinations, and training-loss logs."""
