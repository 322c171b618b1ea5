"""Python side of the bundles: everything a bundle config calls with ``$medxfer.workflows...``."""
