"""End to end: ResNet-18 inference and training-step throughput, per provider.

* Inference: the model in the run's dtype and memory format, eval mode, under
  ``torch.inference_mode``; images/s = batch / median time of one forward.
* Training step: float32 parameters, autocast to the run's dtype (bf16 by default; fp32 runs
  without autocast, in TF32), forward, cross-entropy, backward, SGD step (momentum 0.9).

Every provider starts from the same weights (BatchNorm parameters and running statistics
randomised as a trained network has them). Before timing, its logits (inference) or its
loss and every parameter gradient of one step (training) are compared with a float32
plain-PyTorch model on the same batch.

The plain-PyTorch model (:class:`resconv.models.TorchResNet`, torchvision's ResNet-18 layout
with the same ``state_dict`` keys as resconv's) is what the eager and torch.compile providers run.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..models import TorchResNet, resnet18
from .cases import DTYPES, FORMATS
from .check import exact_fp32
from .providers import backend_unavailable, capture_graphs
from .roofline import conv_flops
from ..models.layers import NUM_CLASSES, resnet18_layers


def base_state(variant: str, seed: int = 0) -> dict:
    """A ResNet-18 state_dict (float32, CPU): torchvision's initialisation, then BatchNorm
    parameters and running statistics randomised so that eval-mode BN is not the identity."""
    torch.manual_seed(seed)
    model = resnet18(num_classes=NUM_CLASSES[variant], variant=variant)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                k = m.num_features
                m.weight.copy_(torch.rand(k, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(k, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(k, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(k, generator=gen) + 0.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


def model_flops(variant: str, image_size: int, train: bool) -> int:
    """FLOPs per image of the convolutions and the classifier (forward; training adds wgrad
    and dgrad, none for the first layer's input)."""
    fwd = sum(conv_flops(layer, 1) * layer.count for layer in resnet18_layers(variant, image_size))
    first = sum(conv_flops(layer, 1) for layer in resnet18_layers(variant, image_size) if layer.first)
    fc = 2 * 512 * NUM_CLASSES[variant]
    return (3 * fwd - first + 3 * fc) if train else (fwd + fc)


@dataclass(frozen=True)
class E2ECase:
    variant: str
    kind: str  # 'inference' or 'train'
    batch: int
    dtype: str
    fmt: str
    image_size: int

    @property
    def label(self) -> str:
        return f"{self.kind} {self.variant}@{self.image_size} {self.dtype} {self.fmt} N={self.batch}"

    def as_dict(self) -> dict:
        return dict(variant=self.variant, kind=self.kind, batch=self.batch, dtype=self.dtype, fmt=self.fmt,
                    image_size=self.image_size)


@dataclass(frozen=True)
class E2EProvider:
    """``model``: 'torch' or 'resconv-<backend>'; ``wrap``: None, 'graph' or a torch.compile mode."""

    name: str
    model: str
    wrap: Optional[str] = None
    min_budget_s: float = 0.0

    def unavailable(self, case: E2ECase, device: torch.device) -> Optional[str]:
        if self.wrap == "graph":
            if device.type != "cuda":
                return "needs a CUDA GPU"
            if case.kind != "inference":
                return "CUDA graphs are measured for inference only"
        if self.model.startswith("resconv-"):
            return backend_unavailable(self.model[len("resconv-"):], device, DTYPES[case.dtype])
        return None


E2E_PROVIDERS = {
    p.name: p
    for p in (
        E2EProvider("eager", "torch"),
        E2EProvider("eager-graph", "torch", "graph"),
        E2EProvider("compile", "torch", "default", min_budget_s=60.0),
        E2EProvider("compile-max-autotune", "torch", "max-autotune", min_budget_s=240.0),
        E2EProvider("resconv-torch", "resconv-torch"),
        # The first training step compiles and autotunes every kernel variant of the model.
        E2EProvider("resconv-triton", "resconv-triton", min_budget_s=45.0),
        E2EProvider("resconv-cuda", "resconv-cuda"),
        E2EProvider("resconv-triton-graph", "resconv-triton", "graph"),
        E2EProvider("resconv-cuda-graph", "resconv-cuda", "graph"),
    )
}


def build_model(kind: str, variant: str, state: dict) -> nn.Module:
    """'torch' -> TorchResNet; 'resconv-<backend>' -> resconv's ResNet-18 on that backend."""
    if kind == "torch":
        model = TorchResNet(variant, NUM_CLASSES[variant])
    else:
        model = resnet18(num_classes=NUM_CLASSES[variant], variant=variant)
        backend = kind[len("resconv-"):]
        for m in model.modules():
            if hasattr(m, "backend"):
                m.backend = backend
    model.load_state_dict(state, strict=True)
    return model


def make_inputs(case: E2ECase, device: torch.device, n: int, gen: torch.Generator):
    """n batches of random images (run dtype for inference, float32 under autocast for
    training) in the run's memory format, and class labels; ``gen`` on ``device``."""
    classes = NUM_CLASSES[case.variant]
    dt = DTYPES[case.dtype] if case.kind == "inference" else torch.float32
    s = case.image_size
    xs = [torch.randn(case.batch, 3, s, s, generator=gen, device=device).to(dt).contiguous(
          memory_format=FORMATS[case.fmt]) for _ in range(n)]
    ys = [torch.randint(0, classes, (case.batch,), generator=gen, device=device) for _ in range(n)]
    return xs, ys


def _autocast(case: E2ECase, device: torch.device):
    dt = DTYPES[case.dtype]
    return torch.autocast(device.type, dtype=dt, enabled=dt != torch.float32)


def reference(case: E2ECase, state: dict, x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """float32 plain model on batch (x, y): logits (inference) or (loss, {name: grad}) (training)."""
    model = build_model("torch", case.variant, state).to(device)
    with exact_fp32():
        if case.kind == "inference":
            with torch.inference_mode():
                return model.eval()(x.float()).float()
        model.train()
        loss = F.cross_entropy(model(x.float()), y)
        loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def prepare(provider: E2EProvider, case: E2ECase, state: dict, xs, ys, device: torch.device):
    """Build the provider's model and its timed call.

    Returns:
        (call(i), check() -> (out, grads or None, grad names)).
    """
    model = build_model(provider.model, case.variant, state).to(device)
    fmt = FORMATS[case.fmt]
    if case.kind == "inference":
        model = model.to(dtype=DTYPES[case.dtype], memory_format=fmt).eval()
    else:
        model = model.to(memory_format=fmt).train()
    run = model
    if provider.wrap not in (None, "graph"):
        import torch._dynamo as dynamo

        # Each case compiles afresh: batch sizes, dtypes and train/eval would otherwise pile up
        # guards on one forward until dynamo's recompile limit silently falls back to eager.
        dynamo.reset()
        run = torch.compile(model, dynamic=False, mode=None if provider.wrap == "default" else provider.wrap)

    if case.kind == "inference":
        call: Callable[[int], object] = lambda i: run(xs[i])  # noqa: E731
        if provider.wrap == "graph":
            call = capture_graphs(call, len(xs))
        return call, lambda: (call(0), None, None)

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    names = [n for n, _ in model.named_parameters()]

    def loss_of(i):
        with _autocast(case, device):
            return F.cross_entropy(run(xs[i]).float(), ys[i])

    def step(i):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(i)
        loss.backward()
        opt.step()
        return loss

    def check():
        # One forward/backward on a copy of the starting point, no optimiser step; the
        # running statistics it updates are put back so the timed steps start the same.
        buffers = copy.deepcopy(model.state_dict())
        opt.zero_grad(set_to_none=True)
        loss = loss_of(0)
        loss.backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        opt.zero_grad(set_to_none=True)
        model.load_state_dict(buffers)
        return loss.detach(), grads, names

    return step, check
