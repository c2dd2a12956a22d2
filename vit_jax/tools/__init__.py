"""Inspection tools: predict, evaluate, export, plots, attention maps, summary, memory."""
