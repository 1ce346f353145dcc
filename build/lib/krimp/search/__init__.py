"""Per-layer sensitivity, mixed precision from it, and an accuracy-budgeted recipe search."""
