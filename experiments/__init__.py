"""Experiments built on the ccsr loop (not part of the installed package): the shapes world and its proof run."""
