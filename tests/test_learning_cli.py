"""The learning commands end to end, as a user runs them (``python -m resconv ...`` in a
subprocess, so the interpreter switch the commands set for themselves is exercised too), on
tiny sizes: each writes its table, PNG and JSON; one tiny run per command on the Triton
backend (its kernels in the interpreter on a CPU); bad options end in one ``error:`` line
and exit code 2."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest


def _run(*args, timeout=900):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the commands must set it themselves on a CPU machine
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "resconv", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _ok(r):
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _json(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory):
    """A tiny CIFAR-10 in torchvision's on-disk format: 5 training batches and a test batch
    of 12 random 32x32 images each (pickled dicts of uint8 rows and labels)."""
    root = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (12, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, 12))}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def test_cifar10_reader(cifar_folder):
    from resconv.data import cifar10

    xtr, ytr, xte, yte = cifar10(str(cifar_folder.parent))
    assert xtr.shape == (60, 3, 32, 32) and xte.shape == (12, 3, 32, 32) and ytr.shape == (60,)
    with open(cifar_folder / "test_batch", "rb") as f:
        raw = pickle.load(f)
    assert xte[3, 1, 2, 5].item() == pytest.approx(raw["data"][3][1024 + 2 * 32 + 5] / 255.0)  # R, G, B planes
    with pytest.raises(FileNotFoundError, match="--data: no CIFAR-10 batches"):
        cifar10(str(cifar_folder.parent.parent))


@pytest.mark.parametrize("command", [["summary"], ["demo", "filters"], ["demo", "learn-filter"],
                                     ["experiment", "grad-norms"], ["experiment", "degradation"],
                                     ["experiment", "lesion"]])
def test_help_shows_defaults(command):
    r = _ok(_run(*command, "--help", timeout=120))
    assert "(default:" in r.stdout and "--out" in r.stdout and "--device" in r.stdout and "--backend" in r.stdout


@pytest.mark.parametrize("args, option", [
    (["demo", "filters", "--device", "cuda"], "--device cuda"),
    (["demo", "filters", "--photo", "download_all"], "--photo download_all"),  # nothing is fetched
    (["experiment", "grad-norms", "--depth", "5"], "--depth"),
    (["experiment", "degradation", "--depths", "21"], "--depths"),
    (["summary", "resnet7"], "MODEL"),
    (["summary", "plain18", "--variant", "imagenet"], "--variant imagenet"),
    (["demo", "learn-filter", "--dtype", "float64", "--backend", "triton", "--device", "cpu"], "--dtype float64"),
    (["experiment", "lesion", "--data", "/nonexistent"], "--data"),
    (["experiment", "degradation", "--steps", "0"], "argument --steps"),
    (["experiment", "lesion", "--image-size", "3"], "--image-size"),
])
def test_bad_options_are_refused(args, option, tmp_path):
    r = _run(*args, "--out", str(tmp_path), timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and option in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_summary(tmp_path):
    r = _ok(_run("summary", "resnet18", "--variant", "cifar", "--depth", "1", "--out", str(tmp_path)))
    res = _json(tmp_path / "summary.json")
    assert res["total_params"] == 11_173_962 and res["total_macs"] == 555_422_720
    assert [lay["rf"][0] for lay in res["layers"] if lay["name"].startswith("layer")] == [11, 25, 53, 109]
    assert (tmp_path / "summary.png").stat().st_size > 0 and "11,173,962" in (tmp_path / "summary.txt").read_text()
    assert "11,173,962 parameters" in r.stdout


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_summary_empirical(tmp_path, backend):
    _ok(_run("summary", "resnet20", "--image-size", "8", "--depth", "1", "--empirical", "--backend", backend,
             "--device", "cpu", "--out", str(tmp_path)))
    checks = _json(tmp_path / "summary.json")["empirical"]
    assert len(checks) == 5 and all(c["agree"] for c in checks)  # conv1, layer1..3, avgpool


@pytest.mark.parametrize("backend, size", [("torch", 64), ("triton", 16)])
def test_demo_filters(tmp_path, backend, size):
    r = _ok(_run("demo", "filters", "--size", str(size), "--backend", backend, "--device", "cpu",
                 "--out", str(tmp_path)))
    res = _json(tmp_path / "filters.json")
    assert [p["name"] for p in res["panels"]][:5] == ["photo", "sobel-x", "sobel-y", "blur", "sharpen"]
    assert res["panels"][5]["shape"] == [size // 2, size // 2] and res["avg_pool_conv_max_abs_diff"] < 1e-6
    assert (tmp_path / "filters.png").stat().st_size > 0 and "sobel-x" in r.stdout


@pytest.mark.parametrize("backend, extra", [("torch", ["--steps", "300", "--size", "16"]),
                                            ("triton", ["--steps", "3", "--size", "8"])])
def test_demo_learn_filter(tmp_path, backend, extra):
    _ok(_run("demo", "learn-filter", *extra, "--backend", backend, "--device", "cpu", "--out", str(tmp_path)))
    res = _json(tmp_path / "learn_filter.json")
    assert res["final_loss"] < res["initial_loss"] and len(res["losses"]) == int(extra[1]) + 1
    assert res["dtype"] == ("float64" if backend == "torch" else "float32")
    assert (tmp_path / "learn_filter.png").stat().st_size > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_experiment_grad_norms(tmp_path, backend):
    _ok(_run("experiment", "grad-norms", "--depth", "6", "--width", "4", "--batch-size", "2", "--image-size", "4",
             "--backend", backend, "--device", "cpu", "--out", str(tmp_path)))
    res = _json(tmp_path / "grad_norms.json")
    assert set(res["nets"]) == {"plain", "plain no BN", "residual", "residual no BN"}
    assert all(len(n["norms"]) == 6 and min(n["norms"]) > 0 for n in res["nets"].values())
    assert (tmp_path / "grad_norms.png").stat().st_size > 0


def test_experiment_degradation(tmp_path, cifar_folder):
    _ok(_run("experiment", "degradation", "--depths", "8", "14", "--steps", "3", "--batch-size", "8", "--evals", "1",
             "--limit", "32", "--backend", "torch", "--out", str(tmp_path)))
    res = _json(tmp_path / "degradation.json")
    assert set(res["nets"]) == {"plain-8", "resnet-8", "plain-14", "resnet-14"} and res["dataset"] == "digits"
    assert all(n["eval_steps"] == [0, 3] and len(n["step_loss"]) == 3 for n in res["nets"].values())
    _ok(_run("experiment", "degradation", "--depths", "8", "--steps", "1", "--batch-size", "4", "--evals", "1",
             "--data", str(cifar_folder), "--image-size", "8", "--out", str(tmp_path / "cifar")))
    assert _json(tmp_path / "cifar" / "degradation.json")["dataset"] == "cifar10"


def test_experiment_degradation_triton(tmp_path):
    _ok(_run("experiment", "degradation", "--depths", "8", "--steps", "1", "--batch-size", "2", "--evals", "1",
             "--limit", "4", "--image-size", "4", "--backend", "triton", "--device", "cpu", "--out", str(tmp_path)))
    assert (tmp_path / "degradation.png").stat().st_size > 0


@pytest.mark.parametrize("backend, extra", [
    ("torch", ["--limit", "64", "--batch-size", "16", "--width", "16"]),
    # the interpreter's time grows with the filters: 4/8/16/32 instead of 64/128/256/512
    ("triton", ["--limit", "2", "--batch-size", "2", "--image-size", "4", "--width", "4"]),
])
def test_experiment_lesion(tmp_path, backend, extra):
    _ok(_run("experiment", "lesion", "--epochs", "1", *extra, "--backend", backend, "--device", "cpu",
             "--out", str(tmp_path)))
    res = _json(tmp_path / "lesion.json")
    les = {n: {x["block"]: x for x in r["lesions"]} for n, r in res["nets"].items()}
    assert len(les["ResNet-18"]) == len(les["plain-18"]) == 8
    assert les["ResNet-18"]["layer2.0"]["deleted"] == "projection" and les["plain-18"]["layer2.0"]["error"] is None
    assert les["plain-18"]["layer2.1"]["deleted"] == "identity" and les["plain-18"]["layer2.1"]["error"] is not None
    assert (tmp_path / "lesion.png").stat().st_size > 0


# The train command's Triton run is tests/test_cli.py's (the recipe trains the same model).
@pytest.mark.parametrize("backend, extra", [
    ("torch", ["--max-steps", "2", "--epochs", "2", "--batch-size", "8", "--eval-images", "8"]),
])
def test_train_recipe_cifar10(tmp_path, cifar_folder, backend, extra):
    r = _ok(_run("train", "--recipe", "cifar10", "--data", str(cifar_folder), "--image-size", "8", *extra,
                 "--backend", backend, "--device", "cpu", "--out", str(tmp_path)))
    res = _json(tmp_path / "train.json")
    assert res["recipe"]["lr"] == 0.1 and res["recipe"]["batch_size"] == 128 and res["flip"] is True
    assert res["args"]["batch_size"] == int(extra[5]) and res["args"]["lr"] == 0.1  # explicit options win
    assert res["mean"] == [0.4914, 0.4822, 0.4465]
    assert (tmp_path / "filters.png").stat().st_size > 0 and (tmp_path / "feature_maps.png").stat().st_size > 0
    assert "RandomHorizontalFlip" in r.stdout


def test_train_recipe_on_digits_has_no_flip(tmp_path):
    r = _ok(_run("train", "--recipe", "cifar10", "--image-size", "8", "--max-steps", "1", "--epochs", "1",
                 "--batch-size", "8", "--eval-images", "8", "--device", "cpu", "--out", str(tmp_path)))
    res = _json(tmp_path / "train.json")
    assert res["flip"] is False and res["dataset"] == "digits" and "RandomHorizontalFlip" not in r.stdout


def test_train_recipe_refuses_compare(tmp_path):
    r = _run("train", "--recipe", "cifar10", "--compare", "--out", str(tmp_path), timeout=300)
    assert r.returncode == 2 and "error: --compare" in r.stderr
