"""Benchmarks of the ccsr loop on the tiny models (`make bench`); not part of the installed package."""
