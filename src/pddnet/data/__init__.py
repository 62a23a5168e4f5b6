"""Volumes, labels, NIfTI I/O, the synthetic abdomen generator and Learn2Reg datasets."""
