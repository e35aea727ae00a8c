"""Builders of the embedded tiny models (test and demo fixtures), reached through ``ccsr.models`` only."""
