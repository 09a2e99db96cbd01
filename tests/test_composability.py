"""resconv inside the rest of PyTorch: torch.compile (fullgraph, eval and training),
torch.export, CUDA graphs (GPU), DistributedDataParallel with synchronized statistics over
2 gloo processes, state_dict round trips with torchvision, copy.deepcopy and pickling.

Sizes are small because on a CPU the Triton kernels run in the interpreter (a ResNet-18
training step of the triton backend takes minutes there): the full ResNet-18 is compiled in
eval mode with both backends and in training mode with the torch backend; the triton
backend's training graph is compiled on a ResNet basic block with a downsample (the same
custom ops, forward and backward). On a GPU the same tests run the real kernels.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resconv
import resconv.nn as rnn
from resconv import tolerances as T
from resconv.models import resnet18
from resconv.models.resnet import BasicBlock, _downsample
from conftest import randomise_bn, set_backend, test_device

torchvision = pytest.importorskip("torchvision")


def _dev(backend):
    return test_device() if backend == "triton" else "cpu"


def _close(a, b, dtype=torch.float32, factor=1.0):
    tol = T.tolerance(dtype)
    cmp = T.compare(a, b, T.Tolerance(tol.rtol * factor, tol.atol * factor))
    assert cmp.ok, str(cmp)


class SmallNet(nn.Module):
    """Stem conv-bn-relu, one ResNet basic block with a strided 1x1 downsample, pool, fc:
    every fused module kind, small enough for the interpreter."""

    def __init__(self, width: int = 8, classes: int = 5):
        super().__init__()
        self.stem = rnn.ConvBnReLU2d(3, width, 3, padding=1)
        self.block = BasicBlock(width, 2 * width, stride=2, downsample=_downsample(width, 2 * width, 2))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.block(self.stem(x)), 1).flatten(1))


# ---- torch.compile ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode,backend", [("eval", "torch"), ("eval", "triton"), ("train", "torch")])
def test_compile_resnet18_fullgraph(mode, backend):
    """fullgraph=True: any graph break raises. Compiled equals eager resconv."""
    torch._dynamo.reset()
    dev = _dev(backend)
    model = set_backend(randomise_bn(resnet18(num_classes=10, variant="cifar")), backend).to(dev)
    model.train(mode == "train")
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16, device=dev)
    compiled = torch.compile(twin, fullgraph=True)
    if mode == "eval":
        with torch.no_grad():
            _close(compiled(x), model(x).double(), factor=4)
        return
    out_c, out_e = compiled(x), model(x)
    _close(out_c, out_e.double(), factor=4)
    out_c.square().mean().backward()
    out_e.square().mean().backward()
    for (n, p), (_, q) in zip(twin.named_parameters(), model.named_parameters()):
        rel = ((p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-30)).item()
        assert rel < 1e-3, (n, rel)  # Inductor reorders float32 reductions; eager vs eager is exact
    for (n, b), (_, c) in zip(twin.named_buffers(), model.named_buffers()):
        _close(b, c.double(), factor=4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_training_block_fullgraph(backend):
    """The training graph of fused modules (forward, backward through the custom ops' registered
    autograd, running-statistics mutation) compiles with Inductor without graph breaks."""
    torch._dynamo.reset()
    dev = _dev(backend)
    model = set_backend(randomise_bn(SmallNet()), backend).to(dev).train()
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8, device=dev)
    compiled = torch.compile(twin, fullgraph=True)
    for _ in range(2):
        out_c, out_e = compiled(x), model(x)
        _close(out_c, out_e.double(), factor=4)
        out_c.square().mean().backward()
        out_e.square().mean().backward()
    for (n, p), (_, q) in zip(twin.named_parameters(), model.named_parameters()):
        _close(p.grad, q.grad.double(), factor=8)
    for (n, b), (_, c) in zip(twin.named_buffers(), model.named_buffers()):
        assert torch.allclose(b.double(), c.double(), rtol=1e-4, atol=1e-5), n


# ---- torch.export ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_export_eval_resnet18(backend):
    dev = _dev(backend)
    model = set_backend(randomise_bn(resnet18(num_classes=10, variant="cifar")), backend).to(dev).eval()
    x = torch.randn(2, 3, 16, 16, device=dev)
    exported = torch.export.export(model, (x,))
    code = str(exported.graph_module.code)
    if backend == "triton":
        assert "resconv.triton_conv2d_fprop" in code, "the fused op must appear as one node"
    x2 = torch.randn(2, 3, 16, 16, device=dev)
    with torch.no_grad():
        _close(exported.module()(x2), model(x2).double(), factor=4)


# ---- CUDA graphs -------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture_and_replay(backend):
    """A training forward + backward captured once and replayed on new data gives what eager
    gives (outputs, gradients, running statistics)."""
    reason = resconv.available_backends("cuda", torch.float32).get(backend)
    if reason is not None:
        pytest.skip(f"backend {backend} unavailable: {reason}")
    torch.manual_seed(0)
    model = set_backend(randomise_bn(SmallNet(width=32)), backend).cuda().train()
    model = model.to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    static_x = torch.randn(8, 3, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotuning, compilation) outside the capture
        for _ in range(3):
            twin.zero_grad(set_to_none=False)
            twin(static_x).square().mean().backward()
    torch.cuda.current_stream().wait_stream(side)
    state = copy.deepcopy(twin.state_dict())
    model.load_state_dict(state)
    graph = torch.cuda.CUDAGraph()
    twin.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_out = twin(static_x)
        static_out.square().mean().backward()
    twin.load_state_dict(state)  # capture does not run kernels: restore nothing changed, to be sure
    for step in range(2):
        x = torch.randn_like(static_x)
        static_x.copy_(x)
        twin.zero_grad(set_to_none=False)
        graph.replay()
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().mean().backward()
        torch.cuda.synchronize()
        assert torch.allclose(static_out, out, rtol=1e-4, atol=1e-4), f"output differs at replay {step}"
        for (n, p), (_, q) in zip(twin.named_parameters(), model.named_parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-4), f"{n} grad differs at replay {step}"
    for (n, b), (_, c) in zip(twin.named_buffers(), model.named_buffers()):
        assert torch.allclose(b.double(), c.double(), rtol=1e-4, atol=1e-5), n


# ---- DistributedDataParallel and synchronized statistics (2 gloo processes) --------------------
def _global_batch(n=8, classes=5):
    g = torch.Generator().manual_seed(123)
    return torch.randn(3, n, 3, 8, 8, generator=g), torch.randint(0, classes, (3, n), generator=g)


def _ddp_worker(rank, world, init_file, backend, out_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = set_backend(randomise_bn(SmallNet()), backend).to(_dev(backend)).train()
        resconv.nn.convert_sync_batchnorm(model)
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        xs, ys = _global_batch()
        b = xs.shape[1] // world
        losses = []
        for x, y in zip(xs, ys):  # 3 steps, each rank its contiguous half of the global batch
            loss = F.cross_entropy(ddp(x[rank * b:(rank + 1) * b].to(_dev(backend))), y[rank * b:(rank + 1) * b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        mean_losses = torch.stack(losses)
        dist.all_reduce(mean_losses)
        if rank == 0:
            torch.save({"state": {k: v.cpu() for k, v in model.state_dict().items()},
                        "losses": (mean_losses / world).cpu()}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ddp_with_sync_batchnorm_matches_single_process(tmp_path, backend):
    """2 ranks x half the batch, DDP + resconv.nn.convert_sync_batchnorm == one process on the
    whole batch with local statistics: same losses, parameters and running statistics after 3
    SGD steps."""
    import torch.multiprocessing as mp

    out_path = str(tmp_path / "rank0.pt")
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), backend, out_path), nprocs=2,
                       join=True, start_method="spawn")
    got = torch.load(out_path)

    torch.manual_seed(0)
    model = set_backend(randomise_bn(SmallNet()), backend).to(_dev(backend)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for x, y in zip(*_global_batch()):
        loss = F.cross_entropy(model(x.to(_dev(backend))), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().cpu())
    assert torch.allclose(got["losses"], torch.stack(losses), rtol=1e-4, atol=1e-5), (got["losses"], losses)
    for k, v in model.state_dict().items():
        w = got["state"][k]
        if v.dtype == torch.int64:
            assert torch.equal(w, v.cpu()), k
        else:
            assert torch.allclose(w, v.cpu(), rtol=1e-4, atol=1e-5), (k, (w - v.cpu()).abs().max().item())


def _sync_bn_worker(rank, world, init_file, backend, data, out_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for name, cls in (("bn-relu", rnn.ConvBnReLU2d), ("bn-add-relu", rnn.ConvBnAddReLU2d)):
            d = data[name]
            m = cls(8, 16, 3, padding=1, bias=True, momentum=None if name == "bn-relu" else 0.3,
                    process_group=dist.group.WORLD)
            m.load_state_dict(d["state"])
            m.backend = backend
            m.allow_tf32 = False  # compared with float64 at float32 tolerances (a GPU would use TF32)
            m = m.to(_dev(backend)).train()
            n = d["x"].shape[0] // world
            sl = slice(rank * n, (rank + 1) * n)
            x = d["x"][sl].clone().to(_dev(backend)).requires_grad_()
            res = d["res"][sl].clone().to(_dev(backend)).requires_grad_()
            outs = []
            for step in range(2):
                for t in [x, res] + list(m.parameters()):
                    t.grad = None
                out = m(x) if name == "bn-relu" else m(x, res)
                out.backward(d["g"][step][sl].to(_dev(backend)))
                outs.append(out.detach())
            grads = {k: p.grad.clone() for k, p in m.named_parameters()}
            for g in grads.values():
                dist.all_reduce(g)  # the parameter gradient of the whole batch (as DDP sums)
            gathered = {}
            for key, t in (("out", outs[-1]), ("grad_x", x.grad), ("grad_res", res.grad)):
                if t is None:
                    continue
                parts = [torch.empty_like(t) for _ in range(world)]
                dist.all_gather(parts, t.contiguous())
                gathered[key] = torch.cat(parts).cpu()
            results[name] = dict(gathered, grads={k: v.cpu() for k, v in grads.items()},
                                 buffers={k: v.cpu() for k, v in m.named_buffers()})
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sync_batchnorm_two_ranks_matches_batchnorm_on_the_whole_batch(tmp_path, backend):
    """The fused modules with ``process_group=`` on 2 gloo ranks, each with half of the batch,
    against torch.nn Conv2d -> BatchNorm2d (-> + residual) -> ReLU in float64 on the whole
    batch -- what nn.SyncBatchNorm computes (it runs on GPUs only, and needs one per rank): the
    outputs, every gradient and the running statistics after two steps (momentum 0.3 and
    momentum=None, the cumulative average)."""
    import torch.multiprocessing as mp

    data = {}
    for name in ("bn-relu", "bn-add-relu"):
        ref_conv = nn.Conv2d(8, 16, 3, padding=1, bias=True)
        ref_bn = randomise_bn(nn.BatchNorm2d(16, momentum=None if name == "bn-relu" else 0.3))
        fused = rnn.ConvBnReLU2d.from_modules(ref_conv, ref_bn)
        data[name] = dict(state=copy.deepcopy(fused.state_dict()), x=torch.randn(6, 8, 5, 7),
                          res=torch.randn(6, 16, 5, 7), g=[torch.randn(6, 16, 5, 7) for _ in range(2)],
                          ref=(ref_conv, ref_bn))
    out_path = str(tmp_path / "rank0.pt")
    payload = {k: {kk: vv for kk, vv in v.items() if kk != "ref"} for k, v in data.items()}
    mp.start_processes(_sync_bn_worker, args=(2, str(tmp_path / "init"), backend, payload, out_path), nprocs=2,
                       join=True, start_method="spawn")
    got = torch.load(out_path)
    for name, d in data.items():
        conv, bn = (copy.deepcopy(m).double() for m in d["ref"])
        x = d["x"].double().requires_grad_()
        res = d["res"].double().requires_grad_()
        for step in range(2):
            for t in [x, res] + list(conv.parameters()) + list(bn.parameters()):
                t.grad = None
            y = bn(conv(x))
            out = torch.relu(y + res if name == "bn-add-relu" else y)
            out.backward(d["g"][step].double())
        r = got[name]
        _close(r["out"], out)
        _close(r["grad_x"], x.grad, factor=2)  # gradients: 2x the output tolerance (resconv.tolerances)
        if name == "bn-add-relu":
            _close(r["grad_res"], res.grad, factor=2)
        ref_grads = {"weight": conv.weight.grad, "bias": conv.bias.grad, "bn.weight": bn.weight.grad,
                     "bn.bias": bn.bias.grad}
        for k, v in ref_grads.items():
            if k == "bias":  # mathematically zero under BatchNorm: compare on the scale of dW
                assert (r["grads"][k].double() - v).abs().max().item() <= 1e-4 * conv.weight.grad.abs().max().item()
            else:
                assert r["grads"][k].abs().max() > 0, k
                _close(r["grads"][k], v, factor=2)
        for k in ("running_mean", "running_var"):
            _close(r["buffers"][f"bn.{k}"], getattr(bn, k))
        assert int(r["buffers"]["bn.num_batches_tracked"]) == int(bn.num_batches_tracked) == 2


# ---- state_dict, deepcopy, pickle --------------------------------------------------------------
def test_state_dict_round_trip_with_torchvision():
    """torchvision -> resconv -> torchvision: the same keys, values and logits both ways."""
    tv = randomise_bn(torchvision.models.resnet18(num_classes=10)).eval()
    ours = set_backend(resnet18(num_classes=10), "torch").eval()
    ours.load_state_dict(tv.state_dict())
    back = torchvision.models.resnet18(num_classes=10).eval()
    back.load_state_dict(ours.state_dict())
    for (k, v), (k2, v2) in zip(tv.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = tv.double()(x.double())
        _close(ours(x), ref, factor=4)
        _close(back(x), ref, factor=4)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_resnet18_deepcopy_and_pickle(how):
    """A copy is independent (its own Parameters and buffers), computes the same, and its
    fused convs read its own BatchNorms (training one does not move the other's statistics)."""
    model = set_backend(randomise_bn(resnet18(num_classes=10, variant="cifar")), "torch")
    twin = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    twin.eval()
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))
    twin.train()(x)
    assert not torch.equal(twin.bn1.running_mean, model.bn1.running_mean), "the copy's statistics moved"
    assert twin.layer1[0].conv1.bn is twin.layer1[0].bn1
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(model.parameters(), twin.parameters()))


def test_torch_convert_sync_batchnorm_on_fused_model_raises():
    """torch's converter replaces BatchNorms that fused convs compute: the forward must say so
    instead of silently computing with the stale modules; resconv's converter works."""
    model = set_backend(resnet18(num_classes=10, variant="cifar"), "torch")
    broken = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    with pytest.raises(RuntimeError, match=r"no longer a child of its parent.*resconv.nn.convert_sync_batchnorm"):
        broken(torch.randn(2, 3, 8, 8))
    keys = list(model.state_dict())
    resconv.nn.convert_sync_batchnorm(model)
    assert list(model.state_dict()) == keys
    assert all(m.process_group is not None for m in model.modules() if isinstance(m, rnn._ConvBnNd))
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)  # no process group initialised: local statistics


def test_batchnorm_check_holds_no_references_and_survives_rekeying():
    """The parent-side check keeps copies small (a fused conv does not drag its parent along),
    follows a re-keyed Sequential, and is removed by revert()."""
    model = resnet18(num_classes=10, variant="cifar")
    assert len(pickle.dumps(model.conv1)) < len(pickle.dumps(model)) / 10
    seq = nn.Sequential(nn.Identity(), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    resconv.convert(seq)
    set_backend(seq, "torch")
    del seq[0]  # keys renumber: the fused conv and its BatchNorm stay siblings
    x = torch.randn(2, 3, 6, 6)
    assert seq(x).shape == (2, 4, 4, 4)
    resconv.revert(seq)
    assert not seq._forward_pre_hooks and [type(m) for m in seq] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]


def test_convert_keeps_sync_batchnorm_process_group():
    """A model whose BatchNorms are already nn.SyncBatchNorm keeps synchronizing after convert()."""
    tv = nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.resnet18(num_classes=10))
    resconv.convert(tv)
    fused = [m for m in tv.modules() if isinstance(m, rnn._ConvBnNd)]
    assert len(fused) == 1 + 2 * 8 + 3  # the stem, two convs per block, three downsamples
    assert all(m.process_group is not None for m in fused), "every fused conv must keep synchronizing"
