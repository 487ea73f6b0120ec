"""A run's human-facing outputs, built from one report model (model.py).

Layers, top to bottom (import-linter checks them): files (writes report.md, report.html, PNGs) >
console | markdown | html (siblings that never import each other) > plots > model > format.
"""
