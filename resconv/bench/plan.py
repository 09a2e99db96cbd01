"""What a run measures (presets and overrides) and in which order.

Presets:

* ``smoke``: the CPU smoke run (default without a GPU): two small layers, float32,
  channels_last, eval and train-fwdbwd, torch providers and resconv's torch and Triton-interpreter backends, a
  CIFAR ResNet-18 on 16x16 images. Exercises every part of the harness in well under a
  minute; its times are not measurements.
* ``quick``: the default on a GPU, sized for the 10-minute GPU script: every ResNet-18 layer
  (ImageNet and CIFAR) at batch 256, 32 and 1 in bf16 channels_last, every mode; all
  providers but torch.compile per layer (compilation per shape is minutes); end to end
  inference (batch 256, 64, 1) and training (batch 256) with torch.compile.
* ``full``: ``quick`` plus torch.compile (default and max-autotune) per layer and end to
  end, training at batch 64 too, CIFAR end to end, longer timing. Far longer than 10 minutes.

Order: the cases that carry the headline numbers run first, so a time budget cuts the tail:
roofline; per-layer eval (fused fprop) at the largest batch; end to end (first dtype and
format); saved-for-backward memory; per-layer training modes at the largest batch; eval at
the other batches; training modes at the other batches; then the other dtypes and memory
formats (per layer and end to end).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import torch

from .cases import DTYPES, FORMATS, MODES, LayerCase
from .e2e import E2E_PROVIDERS, E2ECase
from .providers import PROVIDERS
from ..models.layers import IMAGE_SIZE
from .shapes import VARIANTS, layers_for
from .timing import TimerConfig

SECTIONS = ("roofline", "layers", "memory", "e2e")


@dataclass
class Plan:
    sections: list = field(default_factory=lambda: list(SECTIONS))
    variants: list = field(default_factory=lambda: ["imagenet", "cifar"])
    layer_filter: Optional[str] = None  # keep layers whose label contains this
    batches: list = field(default_factory=lambda: [256, 32, 1])
    # In priority order: under a time budget the forward-only training mode goes last.
    modes: list = field(default_factory=lambda: ["eval", "train-fwdbwd", "train-bwd", "train-fwd"])
    dtypes: list = field(default_factory=lambda: ["bf16"])
    formats: list = field(default_factory=lambda: ["channels_last"])
    layer_providers: list = field(default_factory=list)
    e2e_providers: list = field(default_factory=list)
    e2e_variants: list = field(default_factory=lambda: ["imagenet"])
    e2e_image_size: Optional[int] = None  # None: 224 (imagenet) / 32 (cifar)
    e2e_batches: list = field(default_factory=lambda: [256, 64, 1])
    train_batches: list = field(default_factory=lambda: [256])
    memory_batches: list = field(default_factory=lambda: [32])
    timer: TimerConfig = field(default_factory=TimerConfig)
    e2e_timer: TimerConfig = field(default_factory=lambda: TimerConfig(warmup_ms=50, rep_ms=300, min_reps=10))
    time_budget_s: Optional[float] = None
    max_sets: int = 64  # input sets rotated per case (fewer when they already exceed L2 thrice)
    cpu_threads: Optional[int] = None  # torch's intra-op CPU threads during the run (None: unchanged)
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        def check(values, allowed, what):
            bad = [v for v in values if v not in allowed]
            if bad:
                raise ValueError(f"{what}: unknown {bad}; expected some of {list(allowed)}")

        check(self.sections, SECTIONS, "sections")
        check(self.variants, VARIANTS, "variants")
        check(self.e2e_variants, IMAGE_SIZE, "e2e variants")
        check(self.modes, MODES, "modes")
        check(self.dtypes, DTYPES, "dtypes")
        check(self.formats, FORMATS, "formats")
        check(self.layer_providers, PROVIDERS, "layer providers")
        check(self.e2e_providers, E2E_PROVIDERS, "end-to-end providers")
        for name, vals in (("batches", self.batches), ("e2e batches", self.e2e_batches),
                           ("train batches", self.train_batches), ("memory batches", self.memory_batches)):
            if any((not isinstance(b, int)) or b < 1 for b in vals):
                raise ValueError(f"{name}: expected positive ints, got {vals}")


_GPU_LAYER = ["eager", "bare-conv", "cudnn-fused", "resconv-triton", "resconv-cuda", "eager-graph",
              "resconv-triton-graph", "resconv-cuda-graph"]
_GPU_E2E = ["eager", "eager-graph", "compile", "resconv-triton", "resconv-cuda", "resconv-triton-graph",
            "resconv-cuda-graph"]

PRESETS = {
    "smoke": dict(
        # train-fwd and train-bwd are left out: in the interpreter a training forward or
        # backward takes 0.5-3 s a call, and train-fwdbwd runs both (the CPU tests run the two
        # other modes with the torch providers).
        variants=["smoke"], batches=[2], modes=["eval", "train-fwdbwd"], dtypes=["fp32"],
        formats=["channels_last"],
        layer_providers=["eager", "bare-conv", "resconv-torch", "resconv-triton"],
        # The interpreter runs a full-width ResNet-18 in tens of seconds per step: torch providers only.
        e2e_providers=["eager", "resconv-torch"],
        # 16 px, batch 4: layer4 still normalises over 16 values per channel (fewer make the
        # training gradients ill-conditioned enough to differ between two correct programs).
        e2e_variants=["cifar"], e2e_image_size=16, e2e_batches=[4], train_batches=[4], memory_batches=[2],
        timer=TimerConfig(warmup_ms=0, rep_ms=0, min_reps=2, max_reps=2, min_warmup_calls=0),
        e2e_timer=TimerConfig(warmup_ms=0, rep_ms=0, min_reps=2, max_reps=2, min_warmup_calls=0),
        max_sets=1,  # caches do not matter here
        # Tiny shapes gain nothing from threads, and on a loaded 2-core CI machine OpenMP's
        # hand-offs dominated: one training step 0.4 s on 1 thread, 1.2-3.8 s on 2.
        cpu_threads=1,
    ),
    # Per-layer timing trimmed to fit ~400 jobs in the GPU script's budget: 5 ms warm-up and
    # 25 ms of timed calls (at least 10) per provider, after its setup and check.
    "quick": dict(layer_providers=_GPU_LAYER, e2e_providers=_GPU_E2E,
                  timer=TimerConfig(warmup_ms=5, rep_ms=25, min_reps=10)),
    "full": dict(
        layer_providers=_GPU_LAYER[:3] + ["compile", "compile-max-autotune"] + _GPU_LAYER[3:],
        e2e_providers=_GPU_E2E + ["compile-max-autotune"], e2e_variants=["imagenet", "cifar"],
        train_batches=[256, 64], timer=TimerConfig(warmup_ms=25, rep_ms=100, min_reps=20),
        e2e_timer=TimerConfig(warmup_ms=100, rep_ms=1000, min_reps=20),
    ),
}


def preset(name: str) -> Plan:
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {list(PRESETS)}, got {name!r}")
    return replace(Plan(), **PRESETS[name])


def default_preset(device: torch.device) -> str:
    return "quick" if device.type == "cuda" else "smoke"


@dataclass(frozen=True)
class Job:
    section: str
    tier: int  # run order (lower first); generation order within a tier
    label: str
    payload: object = None


def jobs(plan: Plan) -> list[Job]:
    """Every unit of work of ``plan`` in run order (see the module docstring)."""
    out: list[Job] = []
    if "roofline" in plan.sections:
        out.append(Job("roofline", 0, "roofline: matmul and copy"))
    layers = layers_for(plan.variants)
    if plan.layer_filter:
        layers = [lay for lay in layers if plan.layer_filter in lay.label]
    batches = sorted(set(plan.batches), reverse=True)
    first = (plan.dtypes[0], plan.formats[0]) if plan.dtypes and plan.formats else None
    if "layers" in plan.sections:
        for dt in plan.dtypes:
            for fmt in plan.formats:
                for b in batches:
                    for mode in plan.modes:
                        if (dt, fmt) != first:
                            tier = 7
                        elif b == batches[0]:
                            tier = 1 if mode == "eval" else 4
                        else:
                            tier = 5 if mode == "eval" else 6
                        for lay in layers:
                            case = LayerCase(lay, b, mode, dt, fmt)
                            out.append(Job("layers", tier, f"layer {case.label}", case))
    if "memory" in plan.sections and first:
        for b in sorted(set(plan.memory_batches), reverse=True):
            for lay in layers:
                case = LayerCase(lay, b, "train-fwd", *first)
                out.append(Job("memory", 3, f"saved memory N={b} {lay.label}", case))
        for v in plan.e2e_variants:
            for b in sorted(set(plan.train_batches), reverse=True):
                case = E2ECase(v, "train", b, *first, plan.e2e_image_size or IMAGE_SIZE[v])
                out.append(Job("memory", 3, f"saved memory model {case.label}", case))
    if "e2e" in plan.sections:
        for dt in plan.dtypes:
            for fmt in plan.formats:
                tier = 2 if (dt, fmt) == first else 7
                for v in plan.e2e_variants:
                    size = plan.e2e_image_size or IMAGE_SIZE[v]
                    inf = [E2ECase(v, "inference", b, dt, fmt, size)
                           for b in sorted(set(plan.e2e_batches), reverse=True)]
                    train = [E2ECase(v, "train", b, dt, fmt, size)
                             for b in sorted(set(plan.train_batches), reverse=True)]
                    # The largest inference and training batches first, then the others.
                    for c in inf[:1] + train[:1] + inf[1:] + train[1:]:
                        out.append(Job("e2e", tier, f"e2e {c.label}", c))
    return sorted(out, key=lambda j: j.tier)  # stable: generation order within a tier
