"""The package version, in a module of its own so that any part of lora_lab can read it without
importing the package root (DESIGN.md: no subpackage imports the package root)."""

__version__ = "0.1.0"
