"""`distill sweep`: a hyperparameter search over `train` fields on one Optuna study, every trial
judged on held-out fidelity (app layer: imports the stages lazily)."""
