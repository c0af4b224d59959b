"""Student training: KD losses, data, TRL trainer (issue 4)."""
