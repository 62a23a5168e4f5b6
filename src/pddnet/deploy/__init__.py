"""Deployment artefacts: bundles (``pddnet package``) and Triton model repositories.

- :mod:`~pddnet.deploy.package`  write a verified bundle folder / ``.tar.gz`` (reading and
  verifying one is the runtime's job: :mod:`pddnet.runtime.bundle`)
- :mod:`~pddnet.deploy.triton`   write a Triton Inference Server model repository

Torch-free, like the runtime: packaging runs on the machine that validated the models.
"""
