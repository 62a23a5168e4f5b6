"""The PyTorch reference: PDD-Net, the reference implementation of every custom op, losses, training.

Importing this package imports torch.
"""
