"""Evaluation: metrics and threshold tuning, the evaluation report and its plots."""
