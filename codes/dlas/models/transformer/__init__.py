"""Autoregressive transformers: the DALL-E text+image GPT (``dalle``), its attention with a key/value cache and
its samplers."""
