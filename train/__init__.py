"""Student training: top-k KD losses (`losses`), the corpus read once and turned into aligned
tensors (`data`), the TRL trainer with its one overridden `compute_loss` (`trainer`),
teacher-forced scoring shared with eval (`scoring`) and what a student carries besides its
weights: provenance card, README and loss plot (`card`)."""
