"""The Train tab: an adapter trained with TRL's SFTTrainer, live curves, the best weights kept."""
