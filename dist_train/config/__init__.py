"""Settings and how they are read: the schema, its sections, YAML and overrides, import paths."""
