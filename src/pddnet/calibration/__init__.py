"""Representative data, activation ranges and the FP16 / INT8 graphs, decided by Dice.

docs/precision.md. Modules: :mod:`~pddnet.calibration.data` (calibration pairs),
:mod:`~pddnet.calibration.int8` (ranges and Q/DQ with ``onnxruntime.quantization``),
:mod:`~pddnet.calibration.graphs` (block maps, FP16 storage emulation),
:mod:`~pddnet.calibration.blocks` (keep-FP32 lists, per-block cost),
:mod:`~pddnet.calibration.search` (the sensitivity search), :mod:`~pddnet.calibration.api`
(the commands), :mod:`~pddnet.calibration.validate` (``pddnet validate`` candidates),
:mod:`~pddnet.calibration.report` (``sensitivity.md``). Nothing here imports torch except the
FP16 export and the search (they export from a checkpoint).
"""
