"""Discrete autoencoders: the triforce's ``dvae`` (Gumbel-softmax or EMA vector quantization)."""
