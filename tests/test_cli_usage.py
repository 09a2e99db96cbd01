"""What a new user runs into with the `resconv` command, each item of issue 15 pinned.

The commands run as a user runs them: the installed console script (`resconv`, next to this
Python) in a subprocess, without TRITON_INTERPRET (the commands decide it themselves). A bad
option must end with exit status 2, one `error:` line naming the option and what was
expected, and no traceback; a request this machine cannot serve must never fall back silently.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import gpu_available, set_backend

SCRIPT = shutil.which("resconv", path=str(Path(sys.executable).parent)) or shutil.which("resconv")
no_gpu = pytest.mark.skipif(gpu_available() or torch.cuda.is_available(), reason="checks the no-GPU behaviour")


def run(*args, env=None, cwd=None, timeout=600):
    e = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RESCONV_BACKEND")}
    e.update(env or {})
    cmd = [SCRIPT, *args] if SCRIPT else [sys.executable, "-m", "resconv", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=cwd)


def assert_usage_error(r, *words):
    """Exit 2, an `error:` line with every word, no traceback."""
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_console_script_is_installed():
    assert SCRIPT is not None, "the `resconv` console script is not installed next to this Python"


# 1. no silent device fallback ----------------------------------------------------------------
@no_gpu
@pytest.mark.parametrize("command", [["train", "--max-steps", "1"], ["verify"], ["bench", "--list"]])
def test_device_cuda_without_gpu_is_an_error(command):
    assert_usage_error(run(*command, "--device", "cuda"), "--device cuda", "no usable CUDA GPU")


# 2. numeric options validated at parse time ---------------------------------------------------
@pytest.mark.parametrize("option,value", [("--epochs", "0"), ("--max-steps", "0"), ("--max-steps", "-1"),
                                          ("--batch-size", "0"), ("--image-size", "0"), ("--eval-images", "0")])
def test_train_rejects_non_positive_counts(option, value):
    assert_usage_error(run("train", option, value), f"argument {option}", "expected a positive integer")


@pytest.mark.parametrize("args,words", [
    (["bench", "--batches", "0"], ["--batches", "positive integers"]),
    (["bench", "--modes", "fast"], ["--modes", "unknown fast"]),
    (["bench", "--time-budget", "-5"], ["--time-budget", "positive"]),
    (["verify", "--batch-size", "0"], ["--batch-size", "positive integer"]),
    (["train", "--lr", "0"], ["--lr", "positive"]),
    (["train", "--momentum", "-1"], ["--momentum", "non-negative"]),
])
def test_other_bad_numbers(args, words):
    assert_usage_error(run(*args), *words)


# 3. RESCONV_BACKEND: named in errors, ignored where a backend is given, empty/AUTO accepted ---
def test_bad_backend_env_is_named():
    assert_usage_error(run("train", "--max-steps", "1", env={"RESCONV_BACKEND": "bogus"}), "RESCONV_BACKEND",
                       "bogus")


@no_gpu
def test_backend_env_forcing_cuda_is_named():
    assert_usage_error(run("train", "--max-steps", "1", env={"RESCONV_BACKEND": "cuda"}), "RESCONV_BACKEND=cuda",
                       "cannot run")


def test_bench_list_with_backend_env_set():
    r = run("bench", "--list", "--device", "cpu", env={"RESCONV_BACKEND": "cuda"})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "jobs (preset smoke)" in r.stdout


@pytest.mark.parametrize("value", ["", "AUTO", " Torch "])
def test_backend_env_empty_and_case(monkeypatch, value):
    import resconv.functional as RF

    monkeypatch.setenv("RESCONV_BACKEND", value)
    expect = value.strip().lower() or "auto"
    assert RF.env_backend() == expect
    assert RF.select_backend(None, torch.empty(1)).name == RF.select_backend(expect, torch.empty(1)).name


def test_verify_with_explicit_backend_ignores_a_bad_env(tmp_path):
    out = tmp_path / "v.json"
    r = run("verify", "--device", "cpu", "--backend", "torch", "--image-size", "32", "--batch-size", "1",
            "--json", str(out), env={"RESCONV_BACKEND": "bogus"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(out.read_text())["backends"] == ["torch"]


# 4. the layer table runs no kernel -------------------------------------------------------------
def test_layer_table_runs_no_kernel():
    code = ("import sys, time, resconv.models as M; t = time.perf_counter(); n = len(M.resnet18_layers('imagenet'));"
            "print(n, 'resconv.triton_kernels' in sys.modules, time.perf_counter() - t < 30)")
    env = dict(os.environ, TRITON_INTERPRET="1", RESCONV_BACKEND="triton")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["15", "False", "True"], r.stdout


# 5. bench writes outside the source tree, says it is a smoke run, records what was typed ------
@no_gpu
def test_bench_smoke_output(tmp_path):
    r = run("bench", "--sections", "roofline", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    found = list(tmp_path.glob("resconv-results/bench/cpu-*/*/results.json"))
    assert len(found) == 1, list(tmp_path.rglob("*"))
    res = json.loads(found[0].read_text())
    assert res["env"]["command"] == "resconv bench --sections roofline --no-progress"
    md = (found[0].parent / "results.md").read_text().splitlines()
    assert "smoke run" in md[0].lower() and "not a measurement" in md[2]
    assert r.stderr.count("running on the CPU") == 1  # the banner once, though the command re-ran itself
    assert r.stdout.splitlines()[0].startswith("CPU SMOKE RUN")


def test_chart_labels():
    from resconv.bench import plots

    assert plots._ratio(2.0 ** -8) == "0.0039x" and plots._ratio(4.0) == "4x"
    layer = dict(variant="imagenet", name="layer2.0.conv1", R=3, S=3, stride=[2, 2], C=64, K=128, H=56)
    assert plots._layer_name(layer, False) == "layer2.0.conv1  3x3/2  64->128 @56px"


def test_memory_table_explains_the_reference():
    from resconv.bench import report

    assert "resconv-torch is the plain-PyTorch reference" in report.MEMORY_NOTE


# 6. clean errors instead of tracebacks ---------------------------------------------------------
@no_gpu
def test_forced_cuda_backend_on_cpu():
    assert_usage_error(run("train", "--backend", "cuda", "--max-steps", "1"), "--backend cuda", "cannot run")


def test_missing_data_folder():
    assert_usage_error(run("train", "--data", "/nonexistent"), "--data", "no such directory")


def test_missing_report_file():
    assert_usage_error(run("bench", "--report", "/nonexistent.json"), "--report", "no such file")


def test_folder_without_cifar(tmp_path):
    assert_usage_error(run("train", "--data", str(tmp_path), "--max-steps", "1"), "--data", "CIFAR-10")


# 7. auto on the CPU is torch, and runs the plain ATen sequence --------------------------------
def test_auto_on_cpu_resolves_to_torch_and_says_so(tmp_path):
    r = run("train", "--max-steps", "1", "--image-size", "8", "--eval-images", "4", "--batch-size", "8",
            "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "backend=auto -> torch (no GPU)" in r.stdout


def _activation_passes(model, x, train: bool) -> list:
    """Names of the ATen ops that write a tensor at least as large as one activation (the
    passes over activations that cost time on a CPU), forward and (train) backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    big = x[:, :1].numel() * 8  # one 8-channel activation
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if any(isinstance(o, torch.Tensor) and o.numel() >= big for o in outs):
                seen.append(func.overloadpacket.__name__)
            return out

    with Record():
        if train:
            model(x).sum().backward()
        else:
            with torch.no_grad():
                model(x)
    return seen


@pytest.mark.parametrize("train", [False, True])
def test_converted_model_makes_no_more_passes_than_torch_nn_on_cpu(train):
    """A converted model on the CPU (auto -> torch) passes over its activations no more often
    than the torch.nn model it came from (the reference used to compute statistics,
    normalisation and the epilogue in separate elementwise passes: twice the train step)."""
    import copy

    from torch import nn

    import resconv

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    fused = set_backend(resconv.convert(copy.deepcopy(plain)), "torch")  # what auto is on a CPU (test above)
    plain.train(train), fused.train(train)
    x = torch.randn(2, 3, 8, 8)
    ours, theirs = _activation_passes(fused, x, train), _activation_passes(plain, x, train)
    assert len(ours) <= len(theirs), (ours, theirs)
    assert ours.count("convolution") == theirs.count("convolution") == 2


# 9. optional dependencies checked up front ------------------------------------------------------
def test_missing_optional_dependency_names_the_pip_command(monkeypatch, capsys):
    import importlib.util

    from resconv.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "skimage" else real(name, *a))
    assert main(["verify", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "scikit-image" in err and 'pip install "resconv[data]"' in err and "Traceback" not in err


# 11. help, version, no torch for --help --------------------------------------------------------
def test_help_and_version_do_not_import_torch():
    code = ("import sys\nfrom resconv.cli import main\n"
            "for argv in (['--help'], ['--version'], ['train', '--help'], ['bench', '--help'], ['verify', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"
    assert "resconv 0." in r.stdout


@pytest.mark.parametrize("command", ["train", "verify", "bench", "build"])
def test_every_option_has_help_with_its_default(command):
    import argparse

    from resconv.cli import make_parser

    parser = make_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    for action in sub._actions:
        if action.dest in ("help",):
            continue
        assert action.help and action.help.strip(), f"{command} {action.option_strings}: no help"
    text = sub.format_help()
    if command in ("train", "verify"):
        assert "(default:" in text
    assert "10-minute" not in text and "ten-minute" not in text
    if command == "verify":
        assert "auto" in next(a for a in sub._actions if a.dest == "backend").choices


# 12. PASS only when something was checked -------------------------------------------------------
def test_train_says_nothing_was_checked(tmp_path):
    out = tmp_path / "t.json"
    r = run("train", "--max-steps", "1", "--image-size", "8", "--eval-images", "4", "--batch-size", "8",
            "--json", str(out), "--out", str(tmp_path / "figures"))
    assert r.returncode == 0, r.stderr
    assert "PASS" not in r.stdout and "nothing checked" in r.stdout
    assert "1 of the 540 steps of 3 epochs (--max-steps)" in r.stdout  # 1437 images / batch 8 = 180 a epoch
    assert json.loads(out.read_text())["passed"] is None


def test_evaluation_has_a_progress_bar(monkeypatch):
    import tqdm

    from resconv import train

    seen = []

    class Bar(list):
        def __init__(self, it, **kw):
            seen.append(kw.get("desc"))
            super().__init__(it)

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    args = type("A", (), dict(lr=0.1, momentum=0.9, weight_decay=0.0))()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    t = train.Trainer(model, torch.device("cpu"), torch.float32, args, 1)
    assert 0.0 <= t.accuracy(torch.randn(5, 3, 2, 2), torch.zeros(5, dtype=torch.long), batch=2) <= 1.0
    assert seen == ["test"]


# 13. module errors as torch.nn's -----------------------------------------------------------------
@pytest.mark.parametrize("cls", ["ConvBn2d", "ConvBnReLU2d", "ConvBnAddReLU2d"])
@pytest.mark.parametrize("training", [True, False])
def test_fused_bn_modules_refuse_3d_input_as_batchnorm2d(cls, training):
    import resconv.nn as rnn

    m = getattr(rnn, cls)(4, 8, 3, padding=1).train(training)
    x = torch.randn(4, 6, 6)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        m(x, torch.randn(8, 6, 6)) if cls == "ConvBnAddReLU2d" else m(x)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        torch.nn.BatchNorm2d(8).train(training)(torch.randn(8, 6, 6))
    assert float(m.bn.num_batches_tracked) == 0  # no statistics were updated


def test_from_modules_refuses_batchnorm1d():
    import resconv.nn as rnn

    with pytest.raises(TypeError, match="bn: expected a torch.nn.BatchNorm2d"):
        rnn.ConvBnReLU2d.from_modules(torch.nn.Conv2d(4, 8, 3), torch.nn.BatchNorm1d(8))


def test_convert_refuses_a_name():
    import resconv

    with pytest.raises(TypeError, match="model: expected a torch.nn.Module.*build the model first"):
        resconv.convert("resnet18")


# 14. logging -------------------------------------------------------------------------------------
def test_quiet_silences_resconv_messages():
    loud = run("bench", "--device", "cpu", "--no-write", "--sections", "roofline", "--no-interpret")
    quiet = run("-q", "bench", "--device", "cpu", "--no-write", "--sections", "roofline", "--no-interpret")
    assert loud.returncode == quiet.returncode == 0, loud.stderr + quiet.stderr
    assert "resconv: no CUDA GPU used" in loud.stderr
    assert "resconv:" not in quiet.stderr


def test_build_path_does_not_warn_about_the_missing_cuda_runtime():
    code = "from resconv import build; build._cpp_extension(); print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    assert "No CUDA runtime is found" not in r.stderr
