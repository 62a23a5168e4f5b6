"""Deployment artefacts and the end-to-end job.

- :mod:`~pddnet.deploy.package`  write a verified bundle folder / ``.tar.gz`` (reading and
  verifying one is the runtime's job: :mod:`pddnet.runtime.bundle`)
- :mod:`~pddnet.deploy.triton`   write a Triton Inference Server model repository
- :mod:`~pddnet.deploy.demo`     ``pddnet demo``: synthesise, export, calibrate, validate,
  package and register on the embedded data (imports torch through the export)

Packaging is torch-free, like the runtime: it runs on the machine that validated the models.
"""
