"""Evaluation: metrics, intervals, the operating point, comparisons of runs, tables and figures."""
