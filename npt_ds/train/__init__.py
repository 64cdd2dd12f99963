"""Training: the entry point (`deepspeed --module npt_ds.train`), the loop, losses, optimizer groups, schedules,
evaluation, checkpoints (elastic too) and fault handling."""
