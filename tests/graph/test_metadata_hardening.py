"""Hostile model metadata and checkpoint configs: wrong types, non-finite or unbounded values are
refused with one line naming the key and what it should be -- never a KeyError/TypeError
traceback, and for checkpoints before any network is built.

Explicit cases per key, then property tests (hypothesis) that mutate each ``pddnet.*`` entry
of a real small model (``helpers.fake_models.make_model``) and each field of a checkpoint's
config with random JSON-like values.
"""

from __future__ import annotations

import copy
import json
import math

import onnx
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from helpers.fake_models import make_model, save_model
from helpers.json_paths import DELETE, paths, set_path
from pddnet.errors import PddnetError
from pddnet.graph.model import load_model, read_model_info
from pddnet.spec import config as CF
from pddnet.spec import contract as C
from pddnet.spec.config import PDDConfig, preset

SHAPE = (24, 21, 30)
BASE = make_model(SHAPE, num_labels=13)
BASE_META = {p.key: json.loads(p.value) for p in BASE.metadata_props}


def _with_meta(changes: dict, *, raw: bool = False, model: onnx.ModelProto = BASE):
    """A copy of ``model`` with metadata entries replaced (``raw``: the text as given; a value
    ``None`` under ``raw`` deletes the entry)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for key, value in changes.items():
        for p in list(m.metadata_props):
            if p.key == key:
                m.metadata_props.remove(p)
        if raw and value is None:
            continue
        m.metadata_props.add(key=key, value=value if raw else json.dumps(value, allow_nan=True))
    return m


def _edited(key: str, **kw) -> dict:
    """``{key: the real model's value of key with the fields kw set (or removed by _DEL)}``."""
    value = copy.deepcopy(BASE_META[key])
    for k, v in kw.items():
        if v is _DEL:
            value.pop(k, None)
        else:
            value[k] = v
    return {key: value}


def _input(**kw):
    return _edited(C.META_INPUT, **kw)


def _config(**kw):
    return _edited(C.META_CONFIG, **kw)


_DEL = DELETE


def _refused(fn, *needles):
    with pytest.raises(PddnetError) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg and len(msg) < 1500, msg
    for n in needles:
        assert n in msg, msg
    return msg


# --------------------------------------------------------------------------------------------
# model metadata
# --------------------------------------------------------------------------------------------
INT_MAX = 2 ** 70
METADATA_CASES = [
    # num_labels
    ("labels_str", _input(num_labels="13"), "pddnet.input.num_labels is '13' (str)"),
    ("labels_negative", _input(num_labels=-1), "pddnet.input.num_labels is -1 (int)"),
    ("labels_bool", _input(num_labels=True), "pddnet.input.num_labels is True (bool)"),
    ("labels_float", _input(num_labels=13.0), "an integer in [0, 255]"),
    ("labels_huge", _input(num_labels=10 ** 10), "an integer in [0, 255]"),
    ("labels_config", {**_input(num_labels=_DEL), **_config(num_labels="x")},
     "pddnet.config.num_labels is 'x'"),
    # image_shape
    ("shape_floats", _input(image_shape=[24.0, 21, 30]), "image_shape is [24.0, 21, 30]"),
    ("shape_strings", _input(image_shape=["24", "21", "30"]), "three integers in [6, 1024]"),
    ("shape_bools", _input(image_shape=[True, 21, 30]), "three integers in [6, 1024]"),
    ("shape_huge", _input(image_shape=[24, 21, INT_MAX]), "three integers in [6, 1024]"),
    ("shape_voxels", _input(image_shape=[1024, 1024, 1024]), "at most 268435456 voxels"),
    ("shape_two", _input(image_shape=[24, 21]), "three integers"),
    ("shape_small", _input(image_shape=[24, 21, 3]), "three integers in [6, 1024]"),
    ("shape_dict", _input(image_shape={"i": 24}), "image_shape is {'i': 24}"),
    ("shape_missing", _input(image_shape=_DEL), "lacks 'image_shape'"),
    # spacing
    ("spacing_negative", _input(spacing_mm=[4, -1, 4]), "spacing_mm is [4, -1, 4]"),
    ("spacing_nan", _input(spacing_mm=[4, float("nan"), 4]), "positive finite numbers"),
    ("spacing_str", _input(spacing_mm="4"), "spacing_mm is '4' (str)"),
    ("spacing_bool", _input(spacing_mm=[True, 4, 4]), "positive finite numbers"),
    # intensity
    ("intensity_nan", _input(intensity={"lower": float("nan"), "upper": 1500, "scale": 500}),
     "pddnet.input.intensity is"),
    ("intensity_inf", _input(intensity={"lower": -1000, "upper": float("inf"), "scale": 500}),
     "finite numbers"),
    ("intensity_str", _input(intensity={"lower": "-1000", "upper": 1500, "scale": 500}),
     "finite numbers"),
    ("intensity_missing", _input(intensity={"lower": -1000, "upper": 1500}), "finite numbers"),
    ("intensity_list", _input(intensity=[1, 2, 3]), "intensity is [1, 2, 3]"),
    ("intensity_order", _input(intensity={"lower": 5, "upper": 1, "scale": 1}),
     "not a valid normalisation"),
    ("intensity_mode", _input(intensity={"mode": "MR", "z_lower": -2, "z_upper": 3}),
     "mode must be one of ['ct', 'mr']"),
    ("intensity_mr_missing", _input(intensity={"mode": "mr", "z_lower": -2}),
     "mode 'mr' needs z_lower, z_upper; missing z_upper"),
    ("orientation_int", _input(orientation=5), "orientation is 5 (int)"),
    # outputs / precision / source / format
    ("outputs_str", {C.META_OUTPUTS: "disp"}, "pddnet.outputs is 'disp' (str)"),
    ("outputs_ints", {C.META_OUTPUTS: [1, 2]}, "a list of output names"),
    ("outputs_nested", {C.META_OUTPUTS: [["disp"]]}, "a list of output names"),
    ("precision_list", {C.META_PRECISION: ["fp32"]}, "pddnet.precision is ['fp32']"),
    ("precision_mode", {C.META_PRECISION: {"mode": 16}}, "pddnet.precision is"),
    ("source_str", {C.META_SOURCE: "me"}, "pddnet.source is 'me'"),
    ("format_bool", {C.META_FORMAT: True}, "model format True (bool)"),
    ("format_str", {C.META_FORMAT: "1"}, "model format '1' (str)"),
    ("input_list", {C.META_INPUT: [1]}, "must be JSON objects"),
    # config
    ("config_disp_huge", _config(disp_size=1001), "disp_size must be an odd integer in [3, 31]"),
    ("config_grid_str", _config(grid=["8", 7, 10]), "grid must be three integers in [2, 64]"),
    ("config_grid_short", _config(grid=[8, 7]), "grid must be three integers"),
    ("config_capture_nan", _config(capture=float("nan")), "capture must be a number in (0, 1]"),
    ("config_channels_bool", _config(channels=True), "channels must be an integer in [1, 256]"),
    ("config_missing_grid", _config(grid=_DEL), "pddnet.config lacks ['grid']"),
    ("config_list", {C.META_CONFIG: [1, 2]}, "must be JSON objects"),
]


@pytest.mark.parametrize("case, changes, needle", METADATA_CASES,
                         ids=[c[0] for c in METADATA_CASES])
def test_malformed_metadata_is_refused_with_one_line(case, changes, needle):
    msg = _refused(lambda: read_model_info(_with_meta(changes)), needle)
    print(msg)


@pytest.mark.parametrize("key, text, needle", [
    (C.META_INPUT, "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (C.META_CONFIG, "{", "is not valid JSON"),
    (C.META_CONFIG, '{"channels": ' + "9" * 6000 + "}", "is not valid JSON"),
    (C.META_FORMAT, "NaN", "model format nan (float)"),
    (C.META_OUTPUTS, "", "is not valid JSON"),
])
def test_unparseable_metadata_is_refused_with_one_line(key, text, needle):
    _refused(lambda: read_model_info(_with_meta({key: text}, raw=True)), key, needle)


def _set_output_dims(model, name, dims):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    out = next(o for o in m.graph.output if o.name == name)
    del out.type.tensor_type.shape.dim[:]
    for d in dims:
        dim = out.type.tensor_type.shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d
    return m


@pytest.mark.parametrize("dims, ok", [
    ([24, 21, 30, 3], True),
    (["i", "j", "k", 3], True),          # symbolic dimensions are not contradictions
    ([], True),                           # no declared shape
    ([24, 21, 30, 2], False),
    ([21, 24, 30, 3], False),
    ([1, 24, 21, 30, 3], False),
    ([24, 21, 30], False),
])
def test_disp_output_must_have_the_metadata_shape(dims, ok):
    m = _set_output_dims(BASE, C.OUTPUT_DISP, dims)
    if ok:
        assert read_model_info(m).image_shape == SHAPE
    else:
        _refused(lambda: read_model_info(m), "output 'disp' has shape",
                 "expected [24, 21, 30, 3]")


def test_valid_metadata_reads_as_before(tmp_path):
    info = load_model(save_model(BASE, tmp_path / "m.onnx")).info
    assert info.image_shape == SHAPE and info.num_labels == 13 and info.orientation == "RAS"
    assert info.intensity == {"mode": "ct", "lower": -1000.0, "upper": 1500.0, "scale": 500.0}
    # null spacing / num_labels and a num_labels in the config are still fine
    info = read_model_info(_with_meta({**_input(spacing_mm=None, num_labels=_DEL),
                                       **_config(num_labels=4)}))
    assert info.spacing_mm is None and info.num_labels == 4
    # keys that are not PDDConfig fields are informational, as before
    assert read_model_info(_with_meta(_config(colour="red"))).config["colour"] == "red"


# --------------------------------------------------------------------------------------------
# checkpoint configs
# --------------------------------------------------------------------------------------------
TINY = preset("tiny").as_dict()

CONFIG_CASES = [
    ("not_a_dict", [1, 2], "expected a dict of its fields"),
    ("channels_str", {"channels": "16"}, "channels must be an integer in [1, 256], got '16'"),
    ("channels_bool", {"channels": True}, "channels must be an integer in [1, 256], got True"),
    ("channels_zero", {"channels": 0}, "channels must be an integer in [1, 256]"),
    ("channels_huge", {"channels": 257}, "channels must be an integer in [1, 256]"),
    ("channels_float", {"channels": 4.0}, "got 4.0 (float)"),
    ("channels_bigint", {"channels": 10 ** 400}, "got an integer of 1329 bits"),
    ("grid_str", {"grid": "666"}, "grid must be three integers in [2, 64], got '666'"),
    ("grid_short", {"grid": [6, 6]}, "grid must be three integers"),
    ("grid_long", {"grid": [6, 6, 6, 6]}, "grid must be three integers"),
    ("grid_bool", {"grid": [6, True, 6]}, "grid must be three integers"),
    ("grid_float", {"grid": [6, 6.5, 6]}, "grid must be three integers"),
    ("grid_huge", {"grid": [6, 65, 6]}, "grid must be three integers in [2, 64]"),
    ("grid_int", {"grid": 6}, "grid must be three integers"),
    ("disp_1001", {"disp_size": 1001}, "disp_size must be an odd integer in [3, 31], got 1001"),
    ("disp_even", {"disp_size": 4}, "disp_size must be an odd integer"),
    ("disp_str", {"disp_size": "5"}, "disp_size must be an odd integer"),
    ("disp_nan", {"disp_size": float("nan")}, "disp_size must be an odd integer"),
    ("capture_nan", {"capture": float("nan")}, "capture must be a number in (0, 1], got nan"),
    ("capture_inf", {"capture": float("inf")}, "capture must be a number in (0, 1]"),
    ("capture_zero", {"capture": 0}, "capture must be a number in (0, 1]"),
    ("capture_big", {"capture": 1.5}, "capture must be a number in (0, 1]"),
    ("capture_str", {"capture": "0.3"}, "capture must be a number"),
    ("capture_bool", {"capture": True}, "capture must be a number"),
    ("minconv_int", {"minconv": 3}, "minconv must be one of"),
    ("alpha_short", {"alpha_init": [1, 2, 3, 4, 5]}, "alpha_init must be 6 finite numbers"),
    ("alpha_str", {"alpha_init": "abcdef"}, "alpha_init must be 6 finite numbers"),
    ("alpha_nan", {"alpha_init": [1, 2, 3, 4, 5, float("nan")]}, "alpha_init must be 6"),
    ("penalty_str", {"penalty_init": "x"}, "penalty_init must be a finite number"),
    ("intensity_str", {"intensity": "ct"}, "intensity must be {mode, ...}"),
    ("intensity_mode", {"intensity": {"mode": "pet"}}, "mode must be one of ['ct', 'mr']"),
    ("intensity_mixed", {"intensity": {"mode": "mr", "z_lower": -2, "z_upper": 3, "scale": 5}},
     "unknown keys ['scale'] for mode 'mr'"),
    ("intensity_z_order", {"intensity": {"mode": "mr", "z_lower": 3, "z_upper": -2}},
     "needs z_upper > z_lower"),
    ("intensity_extra", {"intensity": {"lower": 0, "upper": 1, "scale": 1, "gamma": 2}},
     "intensity has unknown keys"),
    ("intensity_nan", {"intensity": {"lower": float("nan"), "upper": 1, "scale": 1}},
     "lower must be a finite number"),
    ("intensity_scale", {"intensity": {"lower": 0, "upper": 1, "scale": 0}}, "scale != 0"),
    ("unknown_key", {"depth": 3}, "unknown PDDConfig keys ['depth']"),
    ("unknown_int_key", {3: 3}, "unknown PDDConfig keys"),
    ("cost_volume", {"grid": [64, 64, 64], "disp_size": 31}, "cost volume of 7.81e+09 elements"),
]


def _cfg(change):
    if not isinstance(change, dict):
        return change
    return {**TINY, **change}


@pytest.mark.parametrize("case, change, needle", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_malformed_configs_are_refused_with_one_line(case, change, needle):
    _refused(lambda: PDDConfig.from_dict(_cfg(change)), "PDDConfig", needle)


def test_bounds_are_inclusive_and_presets_valid():
    for name in CF.PRESETS:
        assert PDDConfig.from_dict(preset(name).as_dict()) == preset(name)
    edge = PDDConfig.from_dict({**TINY, "channels": 256, "grid": [2, 64, 2], "disp_size": 31,
                                "capture": 1.0})
    assert edge.grid == (2, 64, 2) and edge.disp_size == 31
    # the paper's stage two (48^3 grid, 15^3 displacements) is within the cost bound
    PDDConfig.from_dict({**preset("paper").as_dict(), "grid": [48, 48, 48], "capture": 0.2})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from pddnet.model.checkpoint import save_checkpoint
    from pddnet.model.network import PDDNet

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, PDDNet(preset("tiny"), seed=0), image_shape=(24, 24, 24))
    return path, torch.load(path, weights_only=True)


def _save(torch, raw, path):
    torch.save(raw, path)
    return path


@pytest.mark.parametrize("case, change, needle", [
    ("no_config", lambda c: c.pop("config"), "has no config"),
    ("config_none", lambda c: c.update(config=None), "expected a dict of its fields"),
    ("disp_1001", lambda c: c["config"].update(disp_size=1001), "disp_size must be an odd"),
    ("grid_strings", lambda c: c["config"].update(grid=["6", "6", "6"]), "grid must be"),
    ("capture_nan", lambda c: c["config"].update(capture=float("nan")), "capture must be"),
    ("channels_bool", lambda c: c["config"].update(channels=False), "channels must be"),
    ("alpha_len", lambda c: c["config"].update(alpha_init=[1.0] * 7), "alpha_init must be"),
    ("image_shape", lambda c: c.update(image_shape=[24, 24]), "checkpoint image_shape is"),
    ("image_shape_huge", lambda c: c.update(image_shape=[24, 24, 10 ** 9]),
     "three integers in [6, 1024]"),
    ("state_list", lambda c: c.update(state_dict=[1]), "state_dict is [1]"),
    ("state_values", lambda c: c.update(state_dict={"a": 1}), "expected a dict of named tensors"),
    ("version_str", lambda c: c.update(version="1"), "checkpoint version is '1'"),
])
def test_malformed_checkpoints_are_refused_before_any_network(checkpoint, tmp_path, monkeypatch,
                                                               case, change, needle):
    torch = pytest.importorskip("torch")
    from pddnet.model import checkpoint as ck

    built = []
    monkeypatch.setattr(ck, "PDDNet", lambda *a, **k: built.append(a) or pytest.fail("built"))
    raw = copy.deepcopy(checkpoint[1])
    change(raw)
    path = _save(torch, raw, tmp_path / f"{case}.pt")
    msg = _refused(lambda: ck.read_checkpoint(path), str(path), needle)
    print(msg)
    _refused(lambda: ck.load_model(path), needle)
    assert built == []


def test_state_dict_of_the_wrong_shape_is_one_line(checkpoint, tmp_path):
    torch = pytest.importorskip("torch")
    from pddnet.model import checkpoint as ck

    raw = copy.deepcopy(checkpoint[1])
    key = next(k for k, v in raw["state_dict"].items() if v.ndim >= 1)
    raw["state_dict"][key] = torch.zeros(7, 7)
    path = _save(torch, raw, tmp_path / "shape.pt")
    _refused(lambda: ck.load_model(path), "does not match its config")


def test_valid_checkpoint_loads_as_before(checkpoint):
    from pddnet.model.checkpoint import load_model as load_ckpt

    model, ckpt = load_ckpt(checkpoint[0])
    assert model.config == preset("tiny") and ckpt["image_shape"] == [24, 24, 24]


# --------------------------------------------------------------------------------------------
# property tests
# --------------------------------------------------------------------------------------------
LEAVES = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
          | st.integers(min_value=-3, max_value=70)
          | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
          | st.sampled_from(["disp", "RAS", "fp32", "approx", "exact"]))
VALUES = st.recursive(LEAVES, lambda ch: st.lists(ch, max_size=4)
                      | st.dictionaries(st.text(max_size=8), ch, max_size=4), max_leaves=10)
#: plausible-but-wrong values for the known fields (shapes, triples), to reach deeper checks
TRIPLES = st.lists(st.one_of(st.integers(-2, 2000), st.floats(allow_nan=True), st.booleans(),
                             st.text(max_size=3)), min_size=0, max_size=5)
FIELD_VALUES = VALUES | TRIPLES


@st.composite
def mutated_metadata(draw):
    """A ``pddnet.*`` entry of the real model mutated: a field replaced or deleted, the whole
    value replaced, or the JSON text replaced by random text."""
    key = draw(st.sampled_from(sorted(BASE_META)))
    how = draw(st.sampled_from(["field", "field", "field", "whole", "text", "delete"]))
    if how == "text":
        return key, draw(st.text(max_size=30)), True
    if how == "delete":
        return key, None, True
    doc = copy.deepcopy(BASE_META[key])
    if how == "whole":
        return key, draw(FIELD_VALUES), False
    path = draw(st.sampled_from(list(paths(doc))[1:] or [()]))
    value = draw(st.just(_DEL) | FIELD_VALUES) if path else draw(FIELD_VALUES)
    return key, set_path(doc, path, value), False


@settings(max_examples=50, deadline=None, database=None)
@given(changes=st.lists(mutated_metadata(), min_size=1, max_size=3),
       disp_dims=st.none() | st.lists(st.integers(0, 40), max_size=5))
def test_property_model_metadata_reads_or_refuses_with_one_line(changes, disp_dims):
    model = BASE
    if disp_dims is not None:
        model = _set_output_dims(model, C.OUTPUT_DISP, disp_dims)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for key, value, raw in changes:
        m = _with_meta({key: value}, raw=raw, model=m)
    try:
        info = read_model_info(m)
    except PddnetError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 1500, str(exc)
        event("refused")
        return
    event("read")
    # what passed has the types the runtime relies on
    assert len(info.image_shape) == 3 and all(type(n) is int and 6 <= n <= 1024
                                              for n in info.image_shape)
    it = info.normalisation
    assert it.mode in ("ct", "mr") and info.intensity == it.as_dict()
    if it.mode == "ct":
        assert all(math.isfinite(v) for v in (it.lower, it.upper, it.scale))
        assert it.upper > it.lower and it.scale != 0
    else:
        assert math.isfinite(it.z_lower) and math.isfinite(it.z_upper) and it.z_upper > it.z_lower
    assert info.spacing_mm is None or all(math.isfinite(s) and s > 0 for s in info.spacing_mm)
    assert info.num_labels is None or (type(info.num_labels) is int and
                                       0 <= info.num_labels <= 255)
    assert all(isinstance(o, str) for o in info.outputs) and isinstance(info.orientation, str)
    cfg = PDDConfig.from_dict({k: v for k, v in info.config.items()
                               if k in PDDConfig.__dataclass_fields__})
    assert cfg.disp_size <= CF.MAX_DISP_SIZE and max(cfg.grid) <= CF.MAX_GRID
    json.dumps(info.as_dict())


@st.composite
def mutated_configs(draw):
    cfg = copy.deepcopy(TINY)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(paths(cfg))[1:]))
        value = draw(st.just(_DEL) | FIELD_VALUES)
        cfg = set_path(cfg, path, value)
    if draw(st.booleans()):
        cfg[draw(st.text(max_size=6))] = draw(VALUES)
    return cfg


@settings(max_examples=50, deadline=None, database=None)
@given(cfg=mutated_configs())
def test_property_checkpoint_configs_load_or_refuse_with_one_line(cfg):
    try:
        c = PDDConfig.from_dict(cfg)
    except PddnetError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 1500, str(exc)
        event("refused")
    else:
        event("accepted")
        assert type(c.channels) is int and CF.MIN_CHANNELS <= c.channels <= CF.MAX_CHANNELS
        assert all(type(g) is int and CF.MIN_GRID <= g <= CF.MAX_GRID for g in c.grid)
        assert c.disp_size % 2 == 1 and CF.MIN_DISP_SIZE <= c.disp_size <= CF.MAX_DISP_SIZE
        assert 0 < c.capture <= 1 and math.isfinite(c.capture)
        assert math.prod(c.grid) * c.disp_size ** 3 <= CF.MAX_COST_VOLUME
        assert PDDConfig.from_dict(c.as_dict()) == c
    # the checkpoint reader says the same (without building a network)
    pytest.importorskip("torch")
    from pddnet.model.checkpoint import check_checkpoint

    raw = {"format": "pddnet-checkpoint", "version": 1, "config": cfg, "state_dict": {},
           "image_shape": [24, 24, 24]}
    try:
        check_checkpoint(raw, where="ckpt.pt")
    except PddnetError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("ckpt.pt: ")
