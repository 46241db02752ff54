"""Stage: training loop, optimizers, schedules, checkpoints, metrics."""
