"""The offline demo: synthetic skills, the shipped teacher, `distill demo`."""
