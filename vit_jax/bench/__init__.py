"""Benchmarks: train/inference speed and MFU, side by side with timm, and the input pipeline."""
