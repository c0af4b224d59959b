"""Student training: top-k KD losses (`losses`), corpus records -> aligned tensors (`data`), the
TRL trainer with its one overridden `compute_loss` (`trainer`), teacher-forced scoring shared with
eval (`scoring`) and the student's provenance card (`card`)."""
