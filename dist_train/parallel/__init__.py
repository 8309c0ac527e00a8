"""How a model is spread over workers (DDP, FSDP2) and its mixed precision: below the
checkpoint layer, which must unwrap models and know their precision."""
