"""The shapes world: rendered scenes every image of which can be checked, its base model, backends and proof run."""
