"""Training: the shared step, optimizer/schedule, the local loop and evaluation."""
