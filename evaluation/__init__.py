"""`distill eval`: a student measured against its teacher on held-out prompts (fidelity,
answers, cost), reported as report.md / report.json / plots."""
