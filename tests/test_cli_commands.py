"""The reading commands a new user meets first: ls, describe, suites named by name, assets, zoo list,
and output cut short by a pipe."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchkit.cli import main
from conftest import ROOT, write


def test_ls_without_a_kind_lists_every_kind_and_the_shipped_suites(plugin_manager, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # outside the checkout: suites are still found
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for kind in ("datasets:", "classifiers:", "defenses:", "attacks:", "score-models:", "suites:"):
        assert kind in out.splitlines()
    shipped = sorted(p.stem for p in (ROOT / "suites").glob("*.yaml"))
    listed = [line.split()[0] for line in out.split("suites:\n", 1)[1].splitlines() if line.startswith("  ")]
    assert listed == shipped and "digits_advtrain" in listed and "_base" not in " ".join(listed)
    assert main(["ls", "suites", "--dir", str(tmp_path / "nowhere")]) == 2
    assert "--dir" in capsys.readouterr().err


def test_a_shipped_suite_is_named_by_its_name_from_any_folder(plugin_manager, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "digits_quick", "digits_sota.yaml"]) == 0
    assert capsys.readouterr().out.splitlines() == ["digits_quick: ok (3 cells)", "digits_sota.yaml: ok (17 cells)"]
    assert main(["validate", "digits_quik"]) == 2
    assert capsys.readouterr().err.strip() == (
        "benchkit: error: digits_quik: file not found; did you mean the shipped suite 'digits_quick'?")
    # a file in the working folder wins over a shipped suite of the same name
    write(tmp_path / "digits_quick.yaml", "suite: [not, a, mapping\n")
    assert main(["validate", "digits_quick.yaml"]) == 2
    assert "malformed YAML" in capsys.readouterr().err


def test_describe_lists_a_components_params_from_its_model(plugin_manager, capsys):
    from benchkit import registry
    from benchkit.params import describe_fields

    assert main(["describe", "pgd-eot"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pgd-eot (attack, plugin attacks): ")
    table = {line.split()[0]: line for line in out.splitlines()[4:] if line and not line.startswith(" ")}
    fields = registry.get("attacks").get("pgd-eot").params.model_fields
    # every field of the params model is a row, nested models flattened
    assert set(fields) | {"surrogate.kind", "surrogate.steps"} == set(table)
    assert table["eps"].split()[1:5] == ["number", "or", "'a/b'", "8/255"]     # budgets as papers write them
    assert table["steps"].split()[1:3] == ["int", "200"]
    assert table["surrogate.kind"].split()[1:5] == ["'fewer-steps'", "|", "'forward-only'", "required"]
    rows = {r["name"]: r for r in describe_fields(registry.get("defenses").get("diffpure").params)}
    assert rows["t_star"] == {"name": "t_star", "type": "float", "default": 0.1, "description": "diffusion time t*"}
    assert rows["score_model"]["default"] == "required"
    assert rows["sampler"]["type"] == "'vp-sde' | 'vp-ode' | 'ld-sde' | 'ddpm' | 'ddim'"
    assert main(["describe", "pgd-et"]) == 2
    assert capsys.readouterr().err.strip() == "benchkit: error: describe: no component 'pgd-et'; did you mean 'pgd-eot'?"
    assert main(["describe", "identity", "--kind", "defenses"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == ["gradient modes: exact, adjoint, bpda, none", "no parameters"]
    assert main(["describe", "gan-inversion"]) == 0
    assert "gradient modes: depend on the params" in capsys.readouterr().out


def test_assets_lists_each_file_once_and_counts_files(plugin_manager, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCHKIT_HOME", str(tmp_path / "home"))
    assert main(["assets", "celebahq_bpda"]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and all(line.startswith("[MISSING] ") for line in lines)
    ckpt = [line for line in lines if "celeba_hq.ckpt" in line]
    assert len(ckpt) == 1 and ckpt[0].endswith(f"[{ROOT / 'suites' / 'celebahq_bpda.yaml'}: defenses[1], defenses[2]]")


def test_zoo_list_columns_line_up(plugin_manager, capsys):
    assert main(["zoo", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "file", "sha256", "(first", "16)", "description"]
    column = lines[0].index("file")
    assert all(line[column - 2:column] == "  " and line[column] != " " for line in lines[2:])
    assert {line.split()[0] for line in lines[2:]} >= {"digits-cnn", "digits-gan-encoder"}


@pytest.mark.parametrize("argv", [["describe", "diffpure"], ["ls"]])
def test_output_into_a_closed_pipe_is_not_a_traceback(argv):
    # `benchkit ... | head`: the reader has left. Closing the read end before the writer starts makes
    # every write fail (EPIPE), whether the output fits the pipe's buffer or not.
    read, write_end = os.pipe()
    os.close(read)
    code = "import sys; from benchkit.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=120)
    os.close(write_end)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_readme_shows_digits_quick_verbatim_and_names_every_shipped_suite():
    readme = (ROOT / "README.md").read_text()
    quick = (ROOT / "suites" / "digits_quick.yaml").read_text()
    assert "".join("    " + line if line.strip() else "\n" for line in quick.splitlines(True)) in readme
    for path in (ROOT / "suites").glob("*.yaml"):
        assert f"`{path.stem}`" in readme, f"README.md does not list the shipped suite {path.stem}"
    for path in (ROOT / "suites" / "_base").glob("*.yaml"):   # includes never name a suite that is not there
        for word in path.read_text().split():
            if word.startswith("suites/") and word.endswith(".yaml") and word != "suites/SUITE.yaml":
                assert (ROOT / word).is_file(), f"{path.name} mentions {word}, which does not exist"
