"""Torch-free registration: load an artefact, preprocess NIfTI pairs, run a backend, post-process.

Imports numpy, nibabel and onnxruntime only; never torch.
"""
