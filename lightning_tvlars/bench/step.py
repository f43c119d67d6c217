"""Optimizer step benchmark: time, dispatched ops, host syncs and state memory per step.

``lightning-tvlars bench-step`` (or ``python -m lightning_tvlars.bench.step``) builds the
parameter shapes of ResNet-50 and ViT-B/16 (torchvision, no weights) and of a small language
model (a few large matrices), gives them random gradients, and times one ``optimizer.step()``
of each optimizer: median over repeated steps, and the ratio to
``torch.optim.SGD(momentum=0.9, weight_decay=5e-4, foreach=True)`` measured in the same run.

* ops: aten operators dispatched by one step (a ``TorchDispatchMode`` counter; a foreach op
  counts once, as one dispatch);
* host syncs: ``aten._local_scalar_dense`` calls (``.item()``, ``bool(tensor)``, ``if t:``), each a
  device-to-host synchronisation on a GPU; on CUDA, ``torch.cuda.set_sync_debug_mode("error")``
  is also armed around TVLARS steps;
* state: optimizer state bytes / parameter bytes (SGD with momentum: 1.0).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_tvlars import TVLARS, SigmoidPhase
from lightning_tvlars.optim.groups import split_by_ndim

WEIGHT_DECAY = 5e-4


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def host_syncs(self) -> int:
        return self.ops["aten._local_scalar_dense"]


def parameter_shapes(name: str) -> list[torch.Size]:
    """Shapes of a model's parameters: resnet50, vit_b_16, lm, or tiny (for smoke tests)."""
    if name in ("resnet50", "vit_b_16"):
        import torchvision

        with torch.device("meta"):
            model = getattr(torchvision.models, name)()
        return [p.shape for p in model.parameters()]
    if name == "lm":  # embedding + 4 transformer blocks of width 1024, MLP 4096
        block = [
            (3072, 1024),
            (3072,),
            (1024, 1024),
            (1024,),
            (4096, 1024),
            (4096,),
            (1024, 4096),
            (1024,),
            (1024,),
            (1024,),
            (1024,),
            (1024,),
        ]
        return [torch.Size(s) for s in [(32000, 1024), *block * 4, (1024,), (1024,)]]
    if name == "tiny":
        return [torch.Size(s) for s in [(64, 32), (64,), (64,), (10, 64), (10,)]]
    raise ValueError(f"parameter set {name!r} is invalid: expected resnet50, vit_b_16, lm or tiny")


def make_params(shapes: Sequence[torch.Size], device: str, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(shape, generator=gen, device=device) * 0.05)
        p.grad = torch.randn(shape, generator=gen, device=device) * 1e-3
        params.append(p)
    return params


def _tvlars(foreach: bool) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    return lambda ps: TVLARS(
        split_by_ndim(ps, WEIGHT_DECAY),
        lr=1.0,
        momentum=0.9,
        phase=SigmoidPhase(decay=1e-3, delay=1000),
        foreach=foreach,
    )


def _lightly_lars(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    from lightly.utils.lars import LARS

    return LARS(split_by_ndim(ps, WEIGHT_DECAY), lr=1.0, momentum=0.9)


def _timm(name: str, **kwargs: Any) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    def build(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
        import timm.optim

        return getattr(timm.optim, name)(split_by_ndim(ps, WEIGHT_DECAY), lr=1.0, **kwargs)

    return build


OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "SGD foreach": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, weight_decay=WEIGHT_DECAY, foreach=True
    ),
    "SGD fused": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, weight_decay=WEIGHT_DECAY, fused=True
    ),
    "TVLARS foreach": _tvlars(True),
    "TVLARS per-tensor": _tvlars(False),
    "TVLARS compiled": _tvlars(True),  # step wrapped in torch.compile(fullgraph=True)
    "lightly LARS": _lightly_lars,
    "timm Lars": _timm("Lars", momentum=0.9),
    "timm Lamb": _timm("Lamb"),
}


@dataclass
class Result:
    optimizer: str
    median_ms: float
    ops: int
    host_syncs: int
    state_ratio: float
    compile_s: float | None = None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _state_ratio(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter]) -> float:
    state = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )
    return state / sum(p.numel() * p.element_size() for p in params)


def measure(
    names: Sequence[str], shapes: Sequence[torch.Size], device: str, repeats: int
) -> list[Result]:
    """Build every optimizer on its own copy of the parameters, then time them interleaved.

    Steps run round-robin (A B C ... A B C ...), so every optimizer meets the same machine state:
    on CPU the cost of a step depends on whether the allocator recycles the memory of
    temporaries or returns it to the OS (page faults on the next step), which drifts with what
    else the process allocated.
    """
    steps: dict[str, Callable[[], Any]] = {}
    results: dict[str, Result] = {}
    for name in names:
        params = make_params(shapes, device)
        optimizer = OPTIMIZERS[name](params)
        step: Callable[[], Any] = optimizer.step
        compile_s = None
        if name == "TVLARS compiled":
            step = torch.compile(optimizer.step, fullgraph=True)
            start = time.perf_counter()
            for _ in range(3):  # the first call compiles, the second with a dynamic step count
                step()
            _sync(device)
            compile_s = time.perf_counter() - start
        step()  # warm-up: lazy state
        counter = OpCounter()
        if name != "TVLARS compiled":  # a dispatch mode would re-trace the compiled graph
            with counter:
                step()
        steps[name] = step
        results[name] = Result(
            name, 0.0, counter.total, counter.host_syncs, _state_ratio(optimizer, params), compile_s
        )
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name, step in steps.items():
            guard = name.startswith("TVLARS") and device == "cuda"
            _sync(device)
            if guard:
                torch.cuda.set_sync_debug_mode("error")
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
            if guard:
                torch.cuda.set_sync_debug_mode("default")
    for name in names:
        results[name].median_ms = 1e3 * statistics.median(times[name])
    return [results[name] for name in names]


def markdown(results: dict[str, list[Result]], device: str, environment: str) -> str:
    lines = [
        f"## Optimizer step on {device}",
        "",
        environment,
        "",
    ]
    for param_set, rows in results.items():
        base = next(r.median_ms for r in rows if r.optimizer == "SGD foreach")
        lines += [
            f"### {param_set} ({len(parameter_shapes(param_set))} tensors)",
            "",
            "| optimizer | median step (ms) | vs SGD foreach | ops / step | host syncs / step "
            "| state / params |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            ops = "n/a (compiled)" if r.optimizer == "TVLARS compiled" else str(r.ops)
            syncs = "n/a (compiled)" if r.optimizer == "TVLARS compiled" else str(r.host_syncs)
            extra = f" (compile {r.compile_s:.0f} s)" if r.compile_s is not None else ""
            lines.append(
                f"| {r.optimizer}{extra} | {r.median_ms:.2f} | {r.median_ms / base:.2f}x "
                f"| {ops} | {syncs} | {r.state_ratio:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, list[Result]], device: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False)
    for ax, (param_set, rows) in zip(axes[0], results.items(), strict=True):
        base = next(r.median_ms for r in rows if r.optimizer == "SGD foreach")
        ratios = [r.median_ms / base for r in rows]
        colors = ["tab:green" if r.optimizer.startswith("TVLARS") else "tab:gray" for r in rows]
        ax.barh([r.optimizer for r in rows], ratios, color=colors)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        ax.set_xlabel("step time / SGD foreach (log)")
        ax.set_title(f"{param_set} on {device}")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-tvlars bench-step", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sets", nargs="+", default=["resnet50", "vit_b_16", "lm"])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write step_<device>.md/.png here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import platform

    environment = (
        f"torch {torch.__version__}, {platform.machine()} "
        f"{platform.processor() or ''}, {torch.get_num_threads()} thread(s)"
        + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else "")
    )
    results: dict[str, list[Result]] = {}
    for param_set in args.sets:
        results[param_set] = measure(
            args.optimizers, parameter_shapes(param_set), args.device, args.repeats
        )
        for r in results[param_set]:
            print(
                f"{param_set:>9} {r.optimizer:>22}: {r.median_ms:9.2f} ms  {r.ops:5d} ops  "
                f"{r.host_syncs:4d} syncs",
                flush=True,
            )
    text = markdown(results, args.device, environment)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"step_{args.device}.md").write_text(text)
        plot(results, args.device, args.out / f"step_{args.device}.png")


if __name__ == "__main__":
    main()
