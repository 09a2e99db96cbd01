"""Run a :class:`~resconv.bench.plan.Plan`: every job in order, under a time budget, with a
progress bar; every provider checked before it is timed; results collected in one dict
(the JSON schema, see :mod:`resconv.bench.report`) and written as they come.

Each provider attempt: build and first call (setup, timed separately: compilation,
autotuning, cuDNN's algorithm search, graph capture) -> output check against the float32
reference (a failure is recorded with its error and the provider is not timed) -> timing.
An exception is recorded as an error with its message; the run goes on.
"""
from __future__ import annotations

import contextlib
import gc
import math
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Optional

import torch

from . import e2e as E
from . import report
from .cases import DTYPES, LayerCase, grad_names, make_set, reference, set_bytes
from .check import bounds, compare
from .env import collect
from .memory import saved_bytes
from .plan import Job, Plan, jobs
from .providers import PROVIDERS
from .roofline import case_work, measure_peaks, roof
from .timing import Stopwatch, TimerConfig, measure

SCHEMA = "resconv-bench/1"
MAX_WORKING_SET = 4 << 30  # bytes of input sets per case, at most
PARTIAL_WRITE_S = 15.0  # results.json is rewritten at most this often while running


@contextlib.contextmanager
def _run_flags(device: torch.device, cpu_threads: Optional[int]):
    """cudnn.benchmark on (the issue's eager baseline), TF32 for float32 convs and matmuls,
    the plan's CPU thread count; all restored afterwards."""
    old = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    threads = torch.get_num_threads()
    torch.backends.cudnn.benchmark = device.type == "cuda"
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    if cpu_threads is not None:
        torch.set_num_threads(cpu_threads)
    try:
        yield
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = old
        torch.set_num_threads(threads)


def _message(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 600 else text[:600] + " ..."


def _short(rec: dict) -> str:
    st = rec.get("status")
    if st == "ok":
        if "median_ms" in rec:
            return f"{rec['median_ms']:.4g} ms"
        return f"{rec.get('bytes', 0) / 2**20:.3g} MiB"
    if st in ("failed", "error"):
        return f"{st.upper()} ({rec.get('reason')})"
    return st or "?"


class Runner:
    def __init__(self, plan: Plan, device: torch.device, outdir: Optional[Path] = None,
                 progress: Optional[bool] = None):
        plan.validate()
        self.plan, self.device, self.outdir, self.progress = plan, device, outdir, progress
        self.deadline: Optional[float] = None
        self._states: dict = {}
        self.results = dict(
            schema=SCHEMA, env=collect(device), plan=plan.as_dict(),
            tolerances={str(dt).replace("torch.", ""): bounds(dt, tf32=device.type == "cuda")
                        for dt in DTYPES.values()},
            roofline=None, layers=[], memory=[], e2e=[], job_errors=[], skipped=[], complete=False, elapsed_s=0.0,
            jobs_total=0, jobs_done=0,
        )

    # ------------------------------------------------------------------ driver
    def run(self) -> dict:
        todo = jobs(self.plan)
        self.results["jobs_total"] = len(todo)
        t0 = time.monotonic()
        if self.plan.time_budget_s is not None:
            self.deadline = t0 + self.plan.time_budget_s
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="resconv bench", unit="job", file=sys.stderr, dynamic_ncols=True,
                   disable=None if self.progress is None else not self.progress)
        self._log = (lambda s: tqdm.write(s, file=sys.stderr)) if not bar.disable else \
            (lambda s: print(s, file=sys.stderr, flush=True))
        last_write = time.monotonic()
        with _run_flags(self.device, self.plan.cpu_threads):
            for k, job in enumerate(todo):
                bar.set_postfix_str(job.label[:60], refresh=False)
                if self.deadline is not None and time.monotonic() > self.deadline:
                    self.results["skipped"].append(job.label)
                else:
                    try:
                        line = self._run_job(job)
                    except Exception as e:  # outside any provider (inputs, reference): the job is lost, not the run
                        self.results["job_errors"].append(dict(job=job.label, reason=_message(e)))
                        line = f"JOB ERROR ({_message(e)})"
                        self._cleanup()
                    self.results["jobs_done"] = k + 1
                    self._log(f"[{k + 1}/{len(todo)} {time.monotonic() - t0:.0f}s] {job.label}: {line}")
                bar.update()
                self.results["elapsed_s"] = time.monotonic() - t0
                # Partial results survive a run killed from outside (a few hundred KB: not every job).
                if self.outdir is not None and time.monotonic() - last_write > PARTIAL_WRITE_S:
                    report.write_json(self.results, self.outdir / "results.json")
                    last_write = time.monotonic()
        bar.close()
        if self.results["skipped"]:
            self._log(f"time budget reached: {len(self.results['skipped'])} jobs not run (listed in the results)")
        self.results["complete"] = not self.results["skipped"]
        self.results["elapsed_s"] = time.monotonic() - t0
        return self.results

    def _run_job(self, job: Job) -> str:
        if job.section == "roofline":
            peaks = measure_peaks(self.device, self.plan.dtypes, self.plan.timer)
            self.results["roofline"] = peaks
            mm = ", ".join(f"{k} {v:.4g} TFLOP/s" for k, v in peaks["matmul_tflops"].items())
            return f"matmul {mm}; copy {peaks['copy_gbps']:.4g} GB/s"
        if job.section == "layers":
            row = self._layer_case(job.payload)
            self.results["layers"].append(row)
            return "; ".join(f"{n} {_short(r)}" for n, r in row["providers"].items())
        if job.section == "memory":
            row = self._memory(job.payload)
            self.results["memory"].append(row)
            return "; ".join(f"{n} {_short(r)}" for n, r in row["saved"].items())
        row = self._e2e_case(job.payload)
        self.results["e2e"].append(row)
        return "; ".join(
            f"{n} " + (f"{r['images_per_s']:.4g} img/s" if r.get("status") == "ok" else _short(r))
            for n, r in row["providers"].items()
        )

    # ------------------------------------------------------------------ shared
    def _seed(self, label: str) -> torch.Generator:
        """A generator on the run's device, seeded from the case (reproducible inputs)."""
        return torch.Generator(device=self.device).manual_seed(zlib.crc32(label.encode()) ^ self.plan.seed)

    def _n_sets(self, nbytes: int) -> int:
        """Enough input sets that one cycle through them moves 3x the L2 cache (capped)."""
        if self.device.type != "cuda":
            return max(1, min(self.plan.max_sets, 2))
        l2 = torch.cuda.get_device_properties(self.device).L2_cache_size
        n = math.ceil(3 * l2 / max(nbytes, 1))
        return int(max(2, min(self.plan.max_sets, n, MAX_WORKING_SET // max(nbytes, 1))))

    def _gate(self, why_not: Optional[str], min_budget_s: float) -> Optional[dict]:
        """A record for a provider that will not run (unavailable / out of time), else None."""
        if why_not is not None:
            return dict(status="unavailable", reason=why_not)
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0 or left < min_budget_s:
                return dict(status="skipped",
                            reason=f"time budget: {max(left, 0):.0f} s left, needs ~{min_budget_s:.0f} s")
        return None

    def _cleanup(self) -> None:
        """Collect reference cycles and return cached device memory. A full collection costs
        0.1-0.3 s in a process holding torch and its compiler: done after an exception (its
        traceback holds frames and their tensors) and before each end-to-end measurement (so
        that the previous model's leftovers do not count in its peak memory), not after each
        of the thousands of per-layer attempts (refcounting frees those)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _attempt(self, setup: Callable[[], tuple], n_sets: int, ctx, timer: TimerConfig,
                 track_memory: bool = False) -> dict:
        """setup() -> (call, check); check() -> CheckResult after the first call. Returns the record.
        ``track_memory``: record the peak device memory of the timed calls (the previous
        provider's leftovers collected first, so that they do not count)."""
        rec: dict = {}
        call = check = None
        if track_memory:
            self._cleanup()
        try:
            with ctx():
                with Stopwatch(self.device) as sw:
                    call, check = setup()
                    verdict = check()
                rec["setup_s"] = sw.seconds
                rec["check"] = verdict.as_dict()
                if not verdict.ok:
                    rec["status"] = "failed"
                    rec["reason"] = (f"output check failed: {verdict.worst} relative error {verdict.err:.3g} "
                                     f"> tolerance {verdict.tol:.3g}")
                    return rec
                if track_memory and self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                t = measure(call, n_sets, self.device, timer)
                rec.update(status="ok", median_ms=t.median_ms, timing=t.as_dict())
                if track_memory and self.device.type == "cuda":
                    rec["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
                    rec["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        except Exception as e:  # recorded, and the run goes on
            rec.update(status="error", reason=_message(e))
            failed = True
        else:
            failed = False
        del call, check
        if failed:
            self._cleanup()
        return rec

    # ------------------------------------------------------------------ per layer
    def _layer_case(self, case: LayerCase) -> dict:
        dev, plan = self.device, self.plan
        gen = self._seed(case.label)
        n = self._n_sets(set_bytes(case))
        sets = [make_set(case, dev, gen) for _ in range(n)]
        row = dict(case.as_dict(), label=case.label, n_sets=n, working_set_bytes=n * set_bytes(case), work={},
                   providers={})
        peaks = self.results["roofline"]
        for fn in ("fused", "conv"):
            flops, nbytes = case_work(case, fn)
            w = dict(flops=flops, bytes=nbytes)
            if peaks:
                w["roof_ms"], w["bound"] = roof(flops, nbytes, peaks["matmul_tflops"][case.dtype], peaks["copy_gbps"])
            row["work"][fn] = w
        refs: dict = {}
        ctx = torch.inference_mode if case.mode == "eval" else torch.enable_grad
        for name in plan.layer_providers:
            p = PROVIDERS[name]
            rec = self._gate(p.unavailable(case, dev), p.min_budget_s)
            if rec is None:
                if p.function not in refs:
                    refs[p.function] = reference(case, sets[0], p.function)
                rec = self._attempt(self._layer_setup(p, case, sets, refs[p.function], dev.type == "cuda"), n, ctx,
                                    plan.timer)
            if rec.get("status") == "ok":
                w = row["work"][p.function]
                sec = rec["median_ms"] * 1e-3
                rec["tflops"] = w["flops"] / sec / 1e12
                rec["gbps"] = w["bytes"] / sec / 1e9
                if "roof_ms" in w:
                    rec["roof_fraction"] = w["roof_ms"] / rec["median_ms"]
            row["providers"][name] = rec
        _relative(row["providers"])
        return row

    @staticmethod
    def _layer_setup(p, case: LayerCase, sets, ref, tf32: bool):
        ref_out, ref_grads = ref
        names = grad_names(case, p.function)

        def setup():
            call = p.prepare(case, sets)

            def check():
                out, grads = call(0)
                return compare(out, grads, ref_out, ref_grads if grads is not None else None, names, case.torch_dtype,
                               tf32=tf32)

            return call, check

        return setup

    # ------------------------------------------------------------------ saved memory
    def _memory(self, case) -> dict:
        if isinstance(case, E.E2ECase):
            return self._memory_model(case)
        dev = self.device
        s = make_set(case, dev, self._seed(case.label))
        row = dict(case.as_dict(), label=case.label, level="layer", saved={})
        names = grad_names(case, "fused")
        for name in self._memory_providers(self.plan.layer_providers):
            p = PROVIDERS[name]
            why = p.unavailable(case, dev)
            if why is not None:
                row["saved"][name] = dict(status="unavailable", reason=why)
                continue
            try:
                fwd, wrt = p.build(case, s)
                params = [t for nm, t in zip(names, wrt) if nm in ("weight", "bn_weight", "bn_bias")]
                b, cnt = saved_bytes(fwd, params)
                row["saved"][name] = dict(status="ok", bytes=b, tensors=cnt)
            except Exception as e:
                row["saved"][name] = dict(status="error", reason=_message(e))
                self._cleanup()
        _memory_ratio(row["saved"])
        return row

    @staticmethod
    def _memory_providers(names) -> list:
        """torch.nn (eager) against every resconv backend in the list (graphs/compile add nothing here)."""
        keep = ["eager"] + [n for n in names if n.startswith("resconv-") and not n.endswith("-graph")]
        return list(dict.fromkeys(keep))

    def _memory_model(self, case: "E.E2ECase") -> dict:
        dev = self.device
        state = self._state(case.variant)
        xs, _ = E.make_inputs(case, dev, 1, self._seed(case.label))
        row = dict(case.as_dict(), label=case.label, level="model", saved={})
        for name in self._memory_providers(self.plan.e2e_providers):
            p = E.E2E_PROVIDERS[name]
            why = p.unavailable(case, dev)
            if why is not None:
                row["saved"][name] = dict(status="unavailable", reason=why)
                continue
            try:
                model = E.build_model(p.model, case.variant, state).to(dev)
                model = model.to(memory_format=E.FORMATS[case.fmt]).train()

                def fwd():
                    with E._autocast(case, dev):
                        return model(xs[0])

                b, cnt = saved_bytes(fwd, list(model.parameters()))
                row["saved"][name] = dict(status="ok", bytes=b, tensors=cnt)
            except Exception as e:
                row["saved"][name] = dict(status="error", reason=_message(e))
            self._cleanup()
        _memory_ratio(row["saved"])
        return row

    # ------------------------------------------------------------------ end to end
    def _state(self, variant: str) -> dict:
        if variant not in self._states:
            self._states[variant] = E.base_state(variant, self.plan.seed)
        return self._states[variant]

    def _e2e_case(self, case: "E.E2ECase") -> dict:
        dev, plan = self.device, self.plan
        state = self._state(case.variant)
        x_bytes = case.batch * 3 * case.image_size**2 * torch.empty((), dtype=DTYPES[case.dtype]).element_size()
        n = min(8, self._n_sets(x_bytes))
        xs, ys = E.make_inputs(case, dev, n, self._seed(case.label))
        ref = E.reference(case, state, xs[0], ys[0], dev)
        flops = E.model_flops(case.variant, case.image_size, case.kind == "train")
        row = dict(case.as_dict(), label=case.label, n_sets=n, flops_per_image=flops, providers={})
        peaks = self.results["roofline"]
        ctx = torch.inference_mode if case.kind == "inference" else torch.enable_grad
        dt = DTYPES[case.dtype]
        tf32 = dev.type == "cuda"  # the run enables TF32 (fp32 convs and matmuls on tensor cores)
        for name in plan.e2e_providers:
            p = E.E2E_PROVIDERS[name]
            rec = self._gate(p.unavailable(case, dev), p.min_budget_s)
            if rec is None:

                def setup(p=p):
                    call, check_fn = E.prepare(p, case, state, xs, ys, dev)

                    def check():
                        out, grads, names = check_fn()
                        if case.kind == "inference":
                            return compare(out, None, ref, None, [], dt, level="model", tf32=tf32)
                        ref_loss, ref_grads = ref
                        return compare(out, grads, ref_loss, [ref_grads[k] for k in names], names, dt, level="model",
                                       tf32=tf32)

                    return call, check

                rec = self._attempt(setup, n, ctx, plan.e2e_timer, track_memory=True)
            if rec.get("status") == "ok":
                rec["images_per_s"] = case.batch / (rec["median_ms"] * 1e-3)
                rec["tflops"] = rec["images_per_s"] * flops / 1e12
                if peaks:
                    rec["roof_fraction"] = rec["tflops"] / peaks["matmul_tflops"][case.dtype]
            row["providers"][name] = rec
        _relative(row["providers"])
        return row


def _relative(providers: dict) -> None:
    """Speedup over eager (eager time / provider time) and time relative to the bare conv."""
    eager = providers.get("eager", {})
    bare = providers.get("bare-conv", {})
    for name, rec in providers.items():
        if rec.get("status") != "ok":
            continue
        if eager.get("status") == "ok":
            rec["speedup_vs_eager"] = eager["median_ms"] / rec["median_ms"]
        if bare.get("status") == "ok":
            rec["time_vs_bare_conv"] = rec["median_ms"] / bare["median_ms"]


def _memory_ratio(saved: dict) -> None:
    eager = saved.get("eager", {})
    for rec in saved.values():
        if rec.get("status") == "ok" and eager.get("status") == "ok" and eager["bytes"]:
            rec["ratio_vs_eager"] = rec["bytes"] / eager["bytes"]


def run(plan: Plan, device: torch.device, outdir: Optional[Path] = None, progress: Optional[bool] = None) -> dict:
    """Run ``plan`` on ``device``; write results.json (as it goes) and, at the end, results.md
    and the PNG charts into ``outdir`` when given. Returns the results dict."""
    runner = Runner(plan, device, outdir, progress)
    results = runner.run()
    if outdir is not None:
        report.write_all(results, outdir)
    return results
