"""Thin entry points: parse, log the resolved config, build, run, report."""
