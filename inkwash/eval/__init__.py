"""Measurement: the Shapes judge, the ShapesEval benchmark, FID/KID with pluggable features, reports.

Imports from models, data, text and sampling; nothing below imports from here.
"""
