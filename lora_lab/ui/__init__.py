"""ipywidgets views over specs and results: thin, no math."""
