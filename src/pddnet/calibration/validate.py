"""FP16 and INT8 graphs as candidates of ``pddnet validate``.

:func:`precision_candidates` adds, beside the FP32 candidate:

* ``onnxruntime-fp16``: the FP16 graph as ONNX Runtime runs it here;
* ``onnxruntime-fp16-emulated``: the same graph with float16 *storage* emulated in float32
  arithmetic (:func:`pddnet.graph.passes.fp16_storage.emulate_fp16_storage`), because the CPU provider
  computes an FP16 graph almost entirely in float32 and drops most of its float16 rounding --
  the emulated candidate is the closer estimate of a GPU's FP16 result;
* ``onnxruntime-int8``: the Q/DQ graph (ONNX Runtime runs its int8 kernels on the CPU).

Each has the Dice gate of its precision (``delta_dice_points``, default 0.5 / 1.0 point per
pair) and two displacement gates in mm against the reference (the same for both precisions;
:data:`~pddnet.validation.compare.DEFAULT_DISP_GATES_MM`): per pair, the 99th percentile over
the fixed grid's voxels of ``|du|`` (``disp_diff_p99_mm``, default 1 mm) and its maximum
(``disp_diff_max_mm``, default 2 mm); a gate passes when every pair passes, so what is
compared with the threshold is the worst pair's value. :func:`annotate_report` adds each
graph's ``pddnet.precision`` and, for FP16, :func:`pddnet.calibration.api.audit_fp16` to the
report (``candidates[name]["precision_info"]``) and a note on the CPU provider.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterator

from pddnet.errors import PddnetError
from pddnet.graph.passes.fp16_storage import emulate_fp16_storage

FP16_NOTE = ("FP16 on ONNX Runtime's CPU provider: most ops have no float16 kernel, so ONNX "
             "Runtime inserts casts, computes them in float32 and drops the float16 rounding "
             "of the activations it passes through; onnxruntime-fp16 therefore measures little "
             "more than float16-rounded weights and constants (see its precision_info.audit). "
             "onnxruntime-fp16-emulated rounds every tensor the graph declares float16 "
             "(float32 arithmetic): the closer estimate of FP16 on a GPU.")


@contextlib.contextmanager
def precision_candidates(*, fp16=None, int8=None, gate_fp16: float = 0.5,
                         gate_int8: float = 1.0, max_disp_p99_mm: float | None = 1.0,
                         max_disp_mm: float | None = 2.0) -> Iterator[list]:
    """The candidates for the given graphs (context manager: the emulated FP16 graph lives in
    a temporary folder until the comparison is done). ``max_disp_p99_mm`` / ``max_disp_mm``:
    the displacement gates in mm (``None``: that gate is not set)."""
    import onnx

    from pddnet.calibration import graphs as G
    from pddnet.validation.compare import Candidate, Gate

    disp = tuple(Gate(metric, float(v)) for metric, v in (("disp_diff_p99_mm", max_disp_p99_mm),
                                                          ("disp_diff_max_mm", max_disp_mm))
                 if v is not None)

    cands: list = []
    with tempfile.TemporaryDirectory(prefix="pddnet-validate-") as tmp:
        if fp16:
            proto = onnx.load(str(fp16))
            mode = G.precision_mode(proto)
            if mode != "fp16":
                raise PddnetError(f"--fp16 {fp16}: this is an {mode} graph, not FP16")
            gate = (Gate("delta_dice_points", gate_fp16), *disp)
            cands.append(Candidate("onnxruntime-fp16", "onnxruntime", Path(fp16), "fp16", {},
                                   gate))
            emu = Path(tmp) / (Path(fp16).stem + ".emulated.onnx")
            onnx.save_model(emulate_fp16_storage(proto), str(emu))
            cands.append(Candidate("onnxruntime-fp16-emulated", "onnxruntime", emu, "fp16", {},
                                   gate))
        if int8:
            proto = onnx.load(str(int8))
            mode = G.precision_mode(proto)
            if mode != "int8":
                raise PddnetError(f"--int8 {int8}: this is an {mode} graph, not INT8 (Q/DQ)")
            cands.append(Candidate("onnxruntime-int8", "onnxruntime", Path(int8), "int8", {},
                                   (Gate("delta_dice_points", gate_int8), *disp)))
        yield cands


def annotate_report(report: dict[str, Any], candidates: list) -> dict[str, Any]:
    """Add ``precision_info`` (the graph's ``pddnet.precision``; FP16: the audit) to each
    precision candidate of ``report``, ``settings.precision_gates`` (per candidate ``{metric:
    threshold}``) and the FP16 note (in place; returns ``report``)."""
    import onnx

    from pddnet.calibration.api import audit_fp16
    from pddnet.spec import contract as C
    from pddnet.spec.metadata import read_metadata

    fp16_seen = False
    # the gates each precision was held to, in the evidence itself (the bundle copies it)
    report.setdefault("settings", {})["precision_gates"] = {
        c.name: {g.metric: g.threshold for g in c.gates} for c in candidates}
    for c in candidates:
        entry = report.get("candidates", {}).get(c.name)
        if entry is None:
            continue
        proto = onnx.load(str(c.model))
        info: dict[str, Any] = {C.META_PRECISION: read_metadata(proto).get(C.META_PRECISION)}
        if c.name == "onnxruntime-fp16":
            fp16_seen = True
            try:
                info["audit"] = audit_fp16(proto)
            except Exception as exc:  # noqa: BLE001 - the audit must not sink the report
                info["audit"] = {"error": f"{type(exc).__name__}: {exc}"}
        entry["precision_info"] = info
    if fp16_seen:
        report.setdefault("notes", []).append(FP16_NOTE)
    return report
