"""Data: the MVTec AD layout, the split and its cached arrays, the synthetic set, synthetic defects."""
