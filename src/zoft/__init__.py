"""zoft."""
