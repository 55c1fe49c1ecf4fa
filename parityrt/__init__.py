"""parityrt."""
