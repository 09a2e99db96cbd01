"""The `resconv` command: wiring, `verify` and `train` end to end on small settings.

Each command runs in a subprocess, as a user runs it (`python -m resconv ...`), so the
interpreter switch the commands set for themselves is exercised too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _run(*args, timeout=3600):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the commands must set it themselves on a CPU machine
    return subprocess.run([sys.executable, "-m", "resconv", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_help_lists_every_subcommand():
    r = _run("--help", timeout=120)
    assert r.returncode == 0, r.stderr
    for name in ("verify", "train", "bench", "build", "summary", "demo", "experiment"):
        assert name in r.stdout


def test_unknown_subcommand_is_refused():
    r = _run("frobnicate", timeout=120)
    assert r.returncode == 2
    assert "invalid choice" in r.stderr


def test_verify_torch_backend_on_photographs(tmp_path):
    out = tmp_path / "verify.json"
    r = _run("verify", "--device", "cpu", "--backend", "torch", "--batch-size", "1", "--image-size", "64",
             "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["passed"] and res["backends"] == ["torch"]
    kinds = [c["kind"] for c in res["checks"]]
    assert kinds.count("model") == 1 and kinds.count("layer") >= 10  # every distinct ResNet-18 layer
    assert all(c["passed"] and c["tolerance_ratio"] <= 1 for c in res["checks"])


def test_verify_refuses_an_unavailable_backend():
    r = _run("verify", "--device", "cpu", "--backend", "cuda", timeout=120)
    assert r.returncode == 2
    assert "backend 'cuda' cannot run" in r.stderr


# The triton run executes every kernel of a ResNet-18 training step in the interpreter: on
# the digits' native 8x8 images, evaluated on 8 test images, it takes minutes; at 32x32 on the
# whole test set, about an hour (the GPU runs the full size).
TRAIN_SMOKE = {
    "torch": ["--max-steps", "2", "--check-steps", "2", "--batch-size", "4"],
    "triton": ["--max-steps", "1", "--check-steps", "1", "--batch-size", "2", "--image-size", "8",
               "--eval-images", "8"],
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_train_compare_few_steps(tmp_path, backend):
    out = tmp_path / "train.json"
    r = _run("train", "--device", "cpu", "--backend", backend, "--compare", *TRAIN_SMOKE[backend],
             "--json", str(out), "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    steps = int(TRAIN_SMOKE[backend][1])
    assert set(res["losses"]) == {"resconv", "torch.nn", "torch.nn-float64"}
    assert len(res["losses"]["resconv"]) == len(res["losses"]["torch.nn"]) == steps
    assert len(res["losses"]["torch.nn-float64"]) == steps  # the first --check-steps, in float64
    assert res["passed"] and "PASS" in r.stdout
    assert res["args"]["backend"] == backend
    assert (tmp_path / "filters.png").stat().st_size > 0 and (tmp_path / "feature_maps.png").stat().st_size > 0
