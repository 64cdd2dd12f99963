"""Planning: a model's shape, per-GPU memory and step cost of a recipe, before any weights or GPUs (`npt-ds plan`)."""
