"""Generation and serving."""
