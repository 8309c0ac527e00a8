"""Models: built-in ones by name, user models by `_target_` import path, transformers
models (`hf.py`); what a model may offer the framework is declared in `protocol.py`."""
