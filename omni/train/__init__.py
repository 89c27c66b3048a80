"""The trainer every stage reuses, its optimizer, checkpoints and metrics."""
