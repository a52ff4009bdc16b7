"""The malformed-input corpus (tests/malformed/*.yaml, see its README): each case's command exits
with its expected status and exactly its expected one-line messages, with no traceback, and
leaves the files it must not touch unchanged."""
from __future__ import annotations

import base64
import hashlib
import importlib
import sys
from pathlib import Path

import pytest
import yaml

from malformed.contract import assert_one_line_errors

CORPUS = Path(__file__).resolve().parent / "malformed"


def _cases() -> list[dict]:
    cases = []
    for manifest in sorted(CORPUS.glob("*.yaml")):
        for case in yaml.safe_load(manifest.read_text()) or []:
            cases.append(case | {"manifest": manifest.name})
    return cases


CASES = _cases()


def _content(spec) -> bytes:
    if isinstance(spec, str):
        return spec.encode()
    if "hex" in spec:
        return bytes.fromhex(spec["hex"])
    if "base64" in spec:
        return base64.b64decode(spec["base64"])
    if "repeat" in spec:
        return (spec.get("head", "") + spec["repeat"] * spec["times"] + spec.get("tail", "")).encode()
    raise ValueError(f"unknown file spec {spec!r}")


def test_names_are_unique():
    names = [c["name"] for c in CASES]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert len(CASES) > 0


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case(case, tmp_path, monkeypatch, capsys):
    from benchkit import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BENCHKIT_HOME", str(tmp_path / "home"))
    for rel, spec in (case.get("files") or {}).items():
        target = tmp_path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(_content(spec))
    if setup := case.get("setup"):
        module, func = setup.split(":")
        sys.path.insert(0, str(CORPUS))
        try:
            getattr(importlib.import_module(module), func)(tmp_path)
        finally:
            sys.path.remove(str(CORPUS))
        capsys.readouterr()
    digests = {rel: hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest() for rel in case.get("keep", [])}
    status = cli.main([str(a) for a in case["argv"]])
    out = capsys.readouterr()
    assert_one_line_errors(status, out.err, case["stderr"], exit=case.get("exit", 2), stdout=out.out)
    for rel, digest in digests.items():
        assert hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest() == digest, f"{rel} was changed"
