"""The `dist-train` command: argument parsing and one small module per command.
Nothing else in the package imports it."""
