"""``pddnet demo``: the main job end to end on the embedded default data.

Each step prints what it does and how long it took; the outputs land in one folder:

    data/                 synthetic abdominal CT (Learn2Reg layout)
    evaluate_test.json    the PyTorch reference on the test pairs
    model.onnx            the exported model
    register/             one pair registered by the torch-free runtime
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import click

from pddnet.errors import PddnetError


@dataclass
class DemoOptions:
    out: Path
    subjects: int = 8
    seed: int = 0
    preset: str = "small"
    checkpoint: Path | None = None     # default: the shipped weights
    threads: int = 2
    overwrite: bool = False
    max_pairs: int | None = None


@dataclass
class DemoState:
    opts: DemoOptions
    paths: dict[str, Path] = field(default_factory=dict)
    results: dict[str, object] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def _step_synth(s: DemoState) -> str:
    from pddnet.data.synth import write_dataset

    data = s.opts.out / "data"
    report = write_dataset(data, subjects=s.opts.subjects, seed=s.opts.seed, preset=s.opts.preset,
                           progress=True, overwrite=True)
    s.paths["data"] = data
    return f"{s.opts.subjects} subjects in {data} (mean initial test Dice " \
           f"{100 * report.mean_test_dice:.1f}%)"


def _step_evaluate(s: DemoState) -> str:
    from pddnet.validation.evaluate import evaluate_checkpoint, format_table, write_json

    result = evaluate_checkpoint(s.paths["checkpoint"], s.paths["data"], split="test",
                                 max_pairs=s.opts.max_pairs, threads=s.opts.threads)
    write_json(result, s.opts.out / "evaluate_test.json")
    s.results["evaluate"] = result
    click.echo(format_table(result))
    m = result["mean"]
    return f"PyTorch reference: Dice {100 * m['initial_dice']:.1f}% -> {100 * m['dice']:.1f}%"


def _step_export(s: DemoState) -> str:
    from pddnet.export.onnx_export import export_checkpoint

    path = export_checkpoint(s.paths["checkpoint"], s.opts.out / "model.onnx",
                             outputs=("probs", "entropy"), overwrite=True)
    s.paths["onnx"] = path
    return f"{path} ({path.stat().st_size / 1e6:.1f} MB)"


def _step_register(s: DemoState) -> str:
    from pddnet.data.learn2reg import Learn2RegDataset
    from pddnet.runtime.session import Registrar

    pair = Learn2RegDataset(s.paths["data"]).pairs("test")[0]
    reg = Registrar(s.paths["onnx"], threads=s.opts.threads)
    result = reg.register(pair.fixed.image, pair.moving.image, moving_labels=pair.moving.label,
                          fixed_labels=pair.fixed.label)
    out = s.opts.out / "register"
    result.save(out, overwrite=True)
    s.paths["register"] = out
    dice = result.dice
    extra = f", Dice {100 * dice:.1f}%" if dice is not None else ""
    return f"{pair} -> {out} (torch-free runtime{extra})"


STEPS: list[tuple[str, Callable[[DemoState], str]]] = [
    ("synthesise the embedded abdomen data", _step_synth),
    ("evaluate the shipped weights (PyTorch reference)", _step_evaluate),
    ("export to ONNX with the ai.pddnet custom ops", _step_export),
    ("register one test pair with the torch-free runtime", _step_register),
]


def run_demo(opts: DemoOptions) -> DemoState:
    """Run every step in order; stop with a clear error at the first failure."""
    from pddnet.weights import shipped_checkpoint

    out = Path(opts.out)
    if out.exists() and any(out.iterdir()):
        if not opts.overwrite:
            raise PddnetError(f"{out} is not empty; pass --overwrite or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    state = DemoState(opts=opts)
    state.paths["checkpoint"] = Path(opts.checkpoint) if opts.checkpoint else shipped_checkpoint(
        opts.preset)
    t_all = time.perf_counter()
    for n, (title, step) in enumerate(STEPS, 1):
        click.secho(f"[{n}/{len(STEPS)}] {title}", bold=True)
        t0 = time.perf_counter()
        summary = step(state)
        state.timings[title] = time.perf_counter() - t0
        click.echo(f"      {summary}  ({state.timings[title]:.1f} s)")
    click.secho(f"demo finished in {time.perf_counter() - t_all:.0f} s; outputs in {out}", bold=True)
    return state
