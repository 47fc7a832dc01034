"""Integrations of pykvshm with serving engines.  Each submodule imports its engine lazily."""
