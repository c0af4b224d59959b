"""Curation filters (issue 3)."""
