"""A third-party plugin, installed the way pip installs one (a dist-info with an entry point),
adds a defense, a CLI verb and a report filter; a suite runs with it end to end."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap

from conftest import ROOT, write

PLUGIN = '''
import torch
from benchkit.defended import Purifier
from benchkit.hookspecs import hookimpl
from benchkit.params import Params


class BlurParams(Params):
    weight: float = 0.5


class Blur(Purifier):
    """Mixes each pixel with its 4-neighbour mean: deterministic, differentiable."""
    gradient_modes = ("exact", "bpda", "none")

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def _purify(self, x, *, gradient, noise):
        k = torch.tensor([[0, .25, 0], [.25, 0, .25], [0, .25, 0]], dtype=x.dtype).view(1, 1, 3, 3)
        k = k.repeat(x.shape[1], 1, 1, 1)
        mean = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=x.shape[1])
        return (1 - self.weight) * x + self.weight * mean


@hookimpl
def register_defenses(register):
    register("blur", lambda p: Blur(p.weight), params=BlurParams, description="outside plugin: neighbour blur")


def _hello(args):
    print("hello from the outside plugin")
    return 0


@hookimpl
def register_commands(cli):
    cli.add_parser("hello", help="outside plugin verb").set_defaults(func=_hello)


@hookimpl
def prepare_jinja2_environment(env):
    env.globals["footer_note"] = "rendered with the outside plugin"
'''


def install(site):
    write(site / "bk_outside.py", PLUGIN)
    dist = site / "bk_outside-0.3.dist-info"
    write(dist / "METADATA", "Metadata-Version: 2.1\nName: bk-outside\nVersion: 0.3\n")
    write(dist / "entry_points.txt", "[benchkit]\noutside = bk_outside\n")


def cli(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "benchkit.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_outside_plugin_runs_a_suite(tmp_path):
    site = tmp_path / "site"
    install(site)
    env = dict(os.environ, PYTHONPATH=str(site))
    suite = write(tmp_path / "s.yaml", textwrap.dedent(f"""
        suite: outside
        include: [{ROOT}/suites/_base/digits.yaml]
        dataset: {{plugin: digits, params: {{n: 16}}}}
        defenses: [{{id: blur, plugin: blur, params: {{weight: 0.3}}}}]
        attacks: [{{id: aa, plugin: autoattack, params: {{eps: 0.3, versions: [standard], n_queries: 100}}}}]
        grid: all
        eval: {{batch_size: 16}}
    """))
    r = cli(["plugins"], env, tmp_path)
    assert r.returncode == 0 and "outside" in r.stdout and "bk-outside" in r.stdout and "0.3" in r.stdout
    assert cli(["hello"], env, tmp_path).stdout.strip() == "hello from the outside plugin"
    r = cli(["run", str(suite), "--out", str(tmp_path / "out")], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "cnn  " in r.stdout and "blur" in r.stdout
    db = sqlite3.connect(tmp_path / "out" / "results.sqlite")
    assert db.execute("SELECT count(*) FROM examples").fetchone()[0] == 16
    prov = db.execute("SELECT provenance_json FROM runs").fetchone()[0]
    assert '"outside": "0.3"' in prov
    # The plugin's parameters are validated by its own model.
    bad = write(tmp_path / "bad.yaml", suite.read_text().replace("weight: 0.3", "weight: heavy"))
    r = cli(["validate", str(bad)], env, tmp_path)
    assert r.returncode == 2 and "defenses[0].params.weight: Input should be a valid number" in r.stderr
    # Without the plugin installed the id is unknown, reported in one line.
    r = cli(["validate", str(suite)], dict(os.environ), tmp_path)
    assert r.returncode == 2 and "unknown defense plugin 'blur'" in r.stderr and "Traceback" not in r.stderr


def test_outside_plugin_report_filter(tmp_path):
    """prepare_jinja2_environment reaches the report's environment."""
    site = tmp_path / "site"
    install(site)
    code = "from benchkit.report import environment; print(environment().globals['footer_note'])"
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(site)),
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "rendered with the outside plugin", r.stderr
