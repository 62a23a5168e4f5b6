"""`--help` of every command (groups and subcommands) exits 0 and shows its options, in-process
and in a subprocess where torch, tensorrt and triton cannot be imported (the commands import
their library code only when run).

Not tested here: what the commands do (their own test modules).
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import click
from click.testing import CliRunner

from pddnet.cli import main


def _commands(group: click.Group, prefix=()):
    for name, cmd in sorted(group.commands.items()):
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))


def test_every_command_has_help():
    cmds = list(_commands(main))
    names = {" ".join(n) for n, _ in cmds}
    assert {"package", "verify", "demo", "validate", "register", "export", "data synth",
            "build", "doctor"} <= names
    for path, cmd in cmds:
        r = CliRunner().invoke(main, [*path, "--help"])
        assert r.exit_code == 0, (path, r.output)
        assert "Usage: " in r.output and "--help" in r.output
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.hidden:
                assert p.opts[0] in r.output, (path, p.opts[0])


def test_help_without_heavy_packages():
    script = textwrap.dedent("""
        import sys
        for m in ("torch", "tensorrt", "triton", "tritonclient", "matplotlib"):
            sys.modules[m] = None
        import click
        from click.testing import CliRunner
        from pddnet.cli import main

        def commands(group, prefix=()):
            for name, cmd in sorted(group.commands.items()):
                yield (*prefix, name)
                if isinstance(cmd, click.Group):
                    yield from commands(cmd, (*prefix, name))

        paths = [()] + list(commands(main))
        assert len(paths) > 15, paths
        for path in paths:
            r = CliRunner().invoke(main, [*path, "--help"])
            assert r.exit_code == 0, (path, r.output)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "tensorrt", "triton")
                        and sys.modules[m] is not None)
        assert not leaked, leaked
        print("HELP OK", len(paths))
    """)
    src = Path(__file__).resolve().parents[2] / "src"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(src), "PATH": ""})
    assert proc.returncode == 0 and "HELP OK" in proc.stdout, proc.stdout + proc.stderr
