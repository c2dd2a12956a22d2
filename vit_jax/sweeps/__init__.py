"""Ablation sweeps: the sweep file format and runner (sweep.py), the report (report.py), the command."""
