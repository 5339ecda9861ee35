"""Labelling: the label job's pipeline and actor, the labels contract, committing a night, warehouse queries."""
