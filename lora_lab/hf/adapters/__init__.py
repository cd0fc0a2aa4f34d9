"""An adapter's life on a model: build peft's config from a spec, attach, save and load, switch,
list and delete, merge (with the one logit check), blend, LoftQ init, read the factors B, A, and
the merged weights that ``export_merged`` writes."""
