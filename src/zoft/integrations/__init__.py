"""zoft inside other libraries' training loops (``hf``: transformers' Trainer)."""
