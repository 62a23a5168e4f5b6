"""Displacement gates in mm for FP16/INT8 (issue 15 part 5) and ``pddnet verify --json``
(part 8): |du| in mm against an independent per-axis computation, the gates of ``validate``
(``Gate``), of the sensitivity search (``choose``) and of ``package`` (a reduced precision over
its gate is not validated, so never chosen automatically), the explanations ``verify`` gives,
and the JSON failure object with the exit-status contract (0 ok, 1 check failed, 2 bad input,
3 internal).

Not tested here: real FP16/INT8 graphs (packaging reads the report and metadata; the graphs
are fake float32 ones, see helpers.deploy_helpers) and the numbers of the shipped weights
(docs/precision.md quotes them with the commands that produced them).
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from helpers.deploy_helpers import build_bundle
from pddnet.errors import PddnetError
from pddnet.runtime.bundle import open_bundle


def _cli(*args):
    from pddnet.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# -- |du| in mm ---------------------------------------------------------------------------------
def test_displacement_difference_in_mm_scales_each_axis_by_its_spacing():
    from pddnet.validation.compare import displacement_difference

    rng = np.random.default_rng(3)
    ref = rng.normal(size=(6, 5, 4, 3)).astype(np.float32)
    diff = rng.normal(scale=0.3, size=(6, 5, 4, 3))
    spacing = np.array([1.5, 2.0, 4.0])
    aff = np.diag([*spacing, 1.0])
    d = displacement_difference(ref + diff, ref, aff)
    # independent reference: each component times its axis's spacing, then the norm
    want = np.sqrt((((ref + diff).astype(np.float64) - ref) ** 2 * spacing ** 2).sum(-1))
    assert d["disp_diff_max_mm"] == pytest.approx(want.max(), rel=1e-6)
    assert d["disp_diff_p99_mm"] == pytest.approx(np.percentile(want, 99), rel=1e-6)
    assert d["disp_diff_p99_mm"] <= d["disp_diff_max_mm"]
    # a rotated grid (orthogonal columns) gives the same mm as the axis-aligned one
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    rot = np.eye(4)
    rot[:3, :3] = q @ np.diag(spacing)
    r = displacement_difference(ref + diff, ref, rot)
    assert r["disp_diff_max_mm"] == pytest.approx(d["disp_diff_max_mm"], rel=1e-9)


def test_one_voxel_shift_along_the_coarse_axis_is_its_spacing():
    from pddnet.validation.compare import displacement_difference

    ref = np.zeros((4, 4, 4, 3))
    moved = ref.copy()
    moved[..., 2] = 1.0                       # one voxel along axis 2 (4 mm)
    d = displacement_difference(moved, ref, np.diag([1.0, 1.0, 4.0, 1.0]))
    assert d["disp_diff_max_vox"] == pytest.approx(1.0)
    assert d["disp_diff_max_mm"] == pytest.approx(4.0)
    assert d["disp_diff_p99_mm"] == pytest.approx(4.0)
    with pytest.raises(PddnetError, match="must both be"):
        displacement_difference(moved[..., :2], ref, np.eye(4))


def test_mm_gate_of_validate_fails_on_the_worst_pair():
    from pddnet.validation.compare import Gate

    recs = [{"pair": "a", "disp_diff_p99_mm": 0.4}, {"pair": "b", "disp_diff_p99_mm": 1.8}]
    res = Gate("disp_diff_p99_mm", 1.0).evaluate(recs)
    assert not res["passed"] and res["worst_pair"] == "b" and res["unit"] == "mm"
    assert "1.8 > 1 mm" in res["reason"]
    assert Gate("disp_diff_p99_mm", 2.0).evaluate(recs)["passed"]


# -- the sensitivity search ----------------------------------------------------------------------
def test_search_excludes_a_block_over_the_mm_gate_and_says_why():
    from pddnet.calibration.search import DispGates, Measure, choose

    alone = {"conv2": Measure(0.05, 0.05, 0.3, 0.01, disp_p99_mm=0.2, disp_max_mm=0.9),
             "softmax": Measure(0.05, 0.05, 1.2, 0.1, disp_p99_mm=1.8, disp_max_mm=4.5)}
    seen = []

    def evaluate(blocks):
        seen.append(sorted(blocks))
        return alone[blocks[0]] if len(blocks) == 1 else \
            Measure(0.1, 0.1, 1.2, 0.1, disp_p99_mm=1.8, disp_max_mm=4.5)

    dec = choose(["conv2", "softmax"], alone, {"conv2": 10.0, "softmax": 20.0}, evaluate,
                 gate=1.0, disp_gates=DispGates(1.0, 2.0))
    assert dec.chosen == ["conv2"]
    assert dec.excluded["softmax"] == "alone p99 |Δu| 1.80 mm > 1 mm; max |Δu| 4.50 mm > 2 mm"
    assert dec.as_dict()["disp_gates_mm"] == {"disp_diff_p99_mm": 1.0, "disp_diff_max_mm": 2.0}
    # without mm gates (the old behaviour) the Dice gate alone lets softmax through
    dec = choose(["conv2", "softmax"], alone, {"conv2": 10.0, "softmax": 20.0}, evaluate,
                 gate=1.0)
    assert dec.chosen == ["softmax", "conv2"]
    with pytest.raises(PddnetError, match="finite number"):
        DispGates(-1.0, 2.0)
    # a measure that lacks the mm values fails a set mm gate (never passes by omission)
    assert Measure(0.0, 0.0, 0.0, 0.0).failures(1.0, DispGates(1.0, None)) == \
        ["p99 |Δu| undefined > 1 mm"]


# -- package, selection, verify -----------------------------------------------------------------
def test_int8_over_the_mm_gate_is_refused_or_never_chosen(tmp_path):
    with pytest.raises(PddnetError, match=r"int8.*not validated.*onnxruntime-int8: "
                       r"p99 \|Δu\| 1.80 mm > 1 mm \(worst pair\), max \|Δu\| 4.50 mm > 2 mm"):
        build_bundle(tmp_path / "a", ("fp32", "int8"), disp_mm={"int8": (1.8, 4.5)})
    res, _ = build_bundle(tmp_path / "b", ("fp32", "fp16", "int8"),
                          disp_mm={"int8": (1.8, 4.5)}, p50={"int8": 10.0, "fp32": 900.0,
                                                             "fp16": 1000.0},
                          allow_unvalidated=True)
    man = json.loads((res.bundle / "manifest.json").read_text())
    assert man["precision_gates"]["disp_diff_p99_mm"] == 1.0
    assert man["precision_gates"]["disp_diff_max_mm"] == 2.0
    int8 = next(m for m in man["models"] if m["precision"] == "int8")
    assert int8["validation"]["passed"] is False
    pkg = [g for g in int8["validation"]["candidates"][0]["gates"] if g.get("source") == "package"]
    assert [(g["metric"], g["passed"]) for g in pkg] == [("disp_diff_p99_mm", False),
                                                         ("disp_diff_max_mm", False)]
    with open_bundle(res.bundle) as b:
        sel = b.select(providers="cpu")
        assert sel.precision == "fp32"  # int8 is fastest but failed its gate
    r = _cli("verify", res.bundle, "--providers", "cpu")
    assert r.exit_code == 0, r.output
    assert "int8 not chosen: p99 |Δu| 1.8 mm > 1 mm gate (onnxruntime-int8); max |Δu| 4.5 mm " \
           "> 2 mm gate" in r.output
    assert "fp16 not chosen: validated, but fp32 is preferred" in r.output
    doc = json.loads(_cli("verify", res.bundle, "--json", "--providers", "cpu").output)
    assert doc["exit_code"] == 0 and doc["failure"] is None
    why = {c["precision"]: c for c in doc["choices"]}
    assert why["fp32"]["chosen"] and not why["int8"]["chosen"]
    assert "1.8 mm > 1 mm" in why["int8"]["why"]


def test_package_gates_are_options(tmp_path):
    # a looser gate lets the same evidence pass; the manifest records the gate used
    res, _ = build_bundle(tmp_path / "c", ("fp32", "int8"), disp_mm={"int8": (1.8, 4.5)},
                          gates={"max_disp_p99_mm": 2.0, "max_disp_mm": 5.0})
    man = json.loads((res.bundle / "manifest.json").read_text())
    assert man["precision_gates"]["disp_diff_p99_mm"] == 2.0
    assert next(m for m in man["models"] if m["precision"] == "int8")["validation"]["passed"]
    # an old report without mm values fails the mm gates (re-validate), FP32 is not gated
    from pddnet.deploy.package import apply_precision_gates

    val = {"passed": True, "candidates": [{"name": "x", "passed": True, "gates": []}]}
    out = apply_precision_gates(json.loads(json.dumps(val)), "int8",
                                {"disp_diff_p99_mm": 1.0, "disp_diff_max_mm": None})
    assert not out["passed"] and "re-run `pddnet validate`" in out["candidates"][0]["gates"][0][
        "reason"]
    assert apply_precision_gates(json.loads(json.dumps(val)), "fp32",
                                 {"disp_diff_p99_mm": 1.0})["passed"]
    r = _cli("package", "--help")
    assert "--max-disp-p99-mm" in r.output and "--max-disp-mm" in r.output


def test_verify_json_failure_objects_and_exit_codes(tmp_path, monkeypatch):
    res, _ = build_bundle(tmp_path / "b", ("fp32",))
    missing = _cli("verify", tmp_path / "nope", "--json")
    doc = json.loads(missing.output)
    assert missing.exit_code == 2 == doc["exit_code"]
    assert doc["failure"]["stage"] == "input" and doc["failure"]["kind"] == "bad_input"
    assert "does not exist" in doc["failure"]["message"] and doc["verified"] is False

    onnx_file = next(res.bundle.glob("models/fp32/*.onnx"))
    onnx_file.write_bytes(onnx_file.read_bytes()[:-10])         # damaged: a check fails
    damaged = _cli("verify", res.bundle, "--json")
    doc = json.loads(damaged.output)
    assert damaged.exit_code == 1 == doc["exit_code"]
    assert doc["failure"]["stage"] == "integrity" and doc["failure"]["kind"] == "check_failed"
    assert "model.fp32.onnx" in doc["failure"]["message"]

    res2, _ = build_bundle(tmp_path / "c", ("fp32",))
    no_trt = json.loads(_cli("verify", res2.bundle, "--json", "--backend", "tensorrt").output)
    assert no_trt["exit_code"] == 2 and no_trt["failure"]["stage"] == "selection"
    assert no_trt["verified"] is True

    import pddnet.runtime.bundle as rb

    def boom(*a, **k):
        raise ZeroDivisionError("injected")

    monkeypatch.setattr(rb.Bundle, "select", boom)
    internal = _cli("verify", res2.bundle, "--json")
    doc = json.loads(internal.output)
    assert internal.exit_code == 3 == doc["exit_code"]
    assert doc["failure"]["kind"] == "internal" and "ZeroDivisionError" in doc["failure"]["message"]


def test_report_says_why_a_precision_may_or_may_not_be_chosen():
    from pddnet.validation.compare import Gate
    from pddnet.validation.render import _precision_choice, to_html, to_markdown

    recs = [{"pair": "a <- b", "disp_diff_p99_mm": 1.8, "disp_diff_max_mm": 1.9,
             "delta_dice_points": 0.1}]

    def cand(name, prec, gates):
        ev = [g.evaluate(recs) for g in gates]
        return {"name": name, "precision": prec, "mode": "ff", "reference": False,
                "gates": ev, "passed": all(g["passed"] for g in ev)}

    report = {"candidates": {
        "pytorch": {"name": "pytorch", "precision": "fp32", "reference": True, "gates": []},
        "onnxruntime-fp16": cand("onnxruntime-fp16", "fp16", (Gate("delta_dice_points", 0.5),)),
        "onnxruntime-int8": cand("onnxruntime-int8", "int8",
                                 (Gate("delta_dice_points", 1.0), Gate("disp_diff_p99_mm", 1.0),
                                  Gate("disp_diff_max_mm", 2.0)))}}
    sec = _precision_choice(report)
    rows = {r[0]: r for r in sec.blocks[1].rows}
    assert rows["int8"][1] == "FAIL"
    assert rows["int8"][2] == "int8 not chosen: p99 |Δu| 1.8 mm > 1 mm gate (onnxruntime-int8)"
    assert rows["fp16"][1] == "PASS" and rows["fp16"][2].startswith("fp16 may be chosen")
    assert "int8 not chosen" in to_markdown([sec])
    page = to_html([sec])
    assert '<td class="t">int8 not chosen' in page   # text cells left-aligned, in a scroll box
    assert '<div class="scroll"><table>' in page
