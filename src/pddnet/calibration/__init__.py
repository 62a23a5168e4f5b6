"""Representative data, activation ranges and the FP16 / INT8 graphs, decided by Dice."""
