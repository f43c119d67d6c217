"""Optimizer step benchmark: time, operators, CUDA kernels, host syncs and memory per step.

``lightning-tvlars bench-step`` builds the parameter shapes of ResNet-50 and ViT-B/16
(torchvision, no weights), of a small language model (a few large matrices) and of two
synthetic stacks of 8 and 32 identical layers, gives them random gradients, and times one
``optimizer.step()`` of each optimizer: median over repeated steps, interleaved (A B C ... A B C
...), and the ratios to ``torch.optim.SGD(momentum=0.9, weight_decay=5e-4, foreach=True)``, to
the same with ``fused=True`` and to TVLARS.

Per step it also reports:

* ops: aten operators dispatched (a ``TorchDispatchMode`` counter; a foreach op counts once);
* kernels (CUDA): GPU kernels launched, from ``torch.profiler`` (the ``layers8`` and
  ``layers32`` sets show whether the count grows with the number of tensors);
* host syncs: ``aten._local_scalar_dense`` calls (``.item()``, ``bool(tensor)``); on CUDA each
  TVLARS step also runs under ``torch.cuda.set_sync_debug_mode("error")``;
* extra memory (CUDA): peak allocated during the step minus allocated before it;
* state: optimizer state bytes / parameter bytes (SGD with momentum: 1.0).

On a shared CPU the state of a process (where the allocator placed the tensors, whether it
recycles the memory of temporaries) moves every step time by 10-30 % from one process to the
next, more than the differences between LARS-type steps. ``--processes N`` repeats the whole
measurement in N fresh processes, one after the other, and reports the median of their medians
with the range. Ratios are then paired: taken within each process, where whatever moves all
steps of that process cancels, and their median (with the range for ``vs TVLARS``) is shown.

Rows are printed as they are measured; with ``--out`` the markdown table and a figure are
written after each parameter set, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_tvlars import LAMB, TVLARS, SigmoidPhase
from lightning_tvlars._validation import (
    OneLineArgumentParser,
    device_argument,
    int_argument,
    missing_bench_modules,
)
from lightning_tvlars.optim.groups import split_by_ndim

WEIGHT_DECAY = 5e-4
PARAMETER_SETS = ("resnet50", "vit_b_16", "lm", "layers8", "layers32", "tiny")


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
    """Shapes of a parameter set (see the module docstring); ``tiny`` is for smoke tests."""
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
    if name in ("layers8", "layers32"):  # Linear(512, 512) + bias + LayerNorm, repeated
        layers = int(name.removeprefix("layers"))
        return [torch.Size(s) for s in [(512, 512), (512,), (512,), (512,)] * layers]
    if name == "tiny":
        return [torch.Size(s) for s in [(64, 32), (64,), (64,), (10, 64), (10,)]]
    raise ValueError(f"parameter set {name!r} is invalid: expected one of {PARAMETER_SETS}")


def make_params(shapes: Sequence[torch.Size], device: str, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(shape, generator=gen, device=device) * 0.05)
        p.grad = torch.randn(shape, generator=gen, device=device) * 1e-3
        params.append(p)
    return params


def _tvlars(
    foreach: bool | None, capturable: bool = False, compiled: bool = False
) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    return lambda ps: TVLARS(
        split_by_ndim(ps, WEIGHT_DECAY),
        lr=1.0,
        momentum=0.9,
        phase=SigmoidPhase(decay=1e-3, delay=1000),
        foreach=foreach,
        capturable=capturable,
        compiled=compiled,
    )


def _lamb(
    foreach: bool | None, capturable: bool = False, compiled: bool = False
) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """The package's LAMB with timm's defaults (``max_grad_norm=1.0``), as ``timm Lamb``."""
    return lambda ps: LAMB(
        split_by_ndim(ps, WEIGHT_DECAY),
        lr=1e-3,
        foreach=foreach,
        capturable=capturable,
        compiled=compiled,
    )


def _lightly_lars(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    from lightly.utils.lars import LARS

    return LARS(split_by_ndim(ps, WEIGHT_DECAY), lr=1.0, momentum=0.9)


def _timm(name: str, **kwargs: Any) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    def build(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
        import timm.optim

        return getattr(timm.optim, name)(split_by_ndim(ps, WEIGHT_DECAY), lr=1.0, **kwargs)

    return build


#: ``TVLARS`` is the default (``foreach=None``); ``TVLARS foreach`` forces the multi-tensor
#: path, ``TVLARS per-tensor`` the elementwise one (``foreach=False``); ``TVLARS compiled``
#: is ``compiled=True`` (the update compiled on the first step); ``TVLARS graph`` (CUDA only) is
#: the ``capturable=True`` step captured once in a CUDA graph and replayed; likewise for
#: ``LAMB``.
OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "SGD foreach": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, weight_decay=WEIGHT_DECAY, foreach=True
    ),
    "SGD fused": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, weight_decay=WEIGHT_DECAY, fused=True
    ),
    "TVLARS": _tvlars(None),
    "TVLARS foreach": _tvlars(True),
    "TVLARS per-tensor": _tvlars(False),
    "TVLARS compiled": _tvlars(None, compiled=True),
    "TVLARS graph": _tvlars(None, capturable=True),
    "LAMB": _lamb(None),
    "LAMB per-tensor": _lamb(False),
    "LAMB compiled": _lamb(None, compiled=True),
    "LAMB graph": _lamb(None, capturable=True),
    "lightly LARS": _lightly_lars,
    "timm Lars": _timm("Lars", momentum=0.9),
    "timm Lamb": _timm("Lamb"),
}
#: The optimizers that need a package beyond the core dependencies.
NEEDS = {"timm Lars": "timm", "timm Lamb": "timm"}
DEFAULT_OPTIMIZERS = (
    "SGD foreach",
    "SGD fused",
    "TVLARS",
    "TVLARS compiled",
    "LAMB",
    "LAMB compiled",
    "lightly LARS",
    "timm Lars",
    "timm Lamb",
)
#: Added to the defaults on CUDA: the captured steps.
GRAPHED = ("TVLARS graph", "LAMB graph")
#: Optimizers of the package (their bars are green; on CUDA their steps run under the sync
#: debugger).
OURS = ("TVLARS", "LAMB")


@dataclass
class Result:
    optimizer: str
    median_ms: float
    ops: int | None
    host_syncs: int | None
    state_ratio: float
    kernels: int | None = None
    extra_memory_mb: float | None = None
    sync_free: bool | None = None
    compile_s: float | None = None
    process_ms: tuple[float, ...] = ()  # the median of each process (``--processes``)

    def _ratios(self, reference: Result) -> list[float]:
        if not self.process_ms:
            return [self.median_ms / reference.median_ms]
        return [a / b for a, b in zip(self.process_ms, reference.process_ms, strict=True)]

    def ratio(self, reference: Result) -> float:
        """This step's time / ``reference``'s, paired: taken in each process (what moves all
        steps of a process cancels), then their geometric median, ``exp(median(log r))``, so
        that ``a.ratio(b) == 1 / b.ratio(a)`` for any number of processes."""
        return math.exp(statistics.median(map(math.log, self._ratios(reference))))

    def ratio_range(self, reference: Result) -> tuple[float, float] | None:
        """Lowest and highest per-process ratio to ``reference`` (None from one process)."""
        ratios = self._ratios(reference)
        return (min(ratios), max(ratios)) if len(ratios) > 1 else None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _state_ratio(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter]) -> float:
    state = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )
    return state / sum(p.numel() * p.element_size() for p in params)


def count_kernels(step: Callable[[], Any]) -> int:
    """GPU kernels (and memory copies) launched by one call of ``step`` (torch.profiler)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


def captured(optimizer: torch.optim.Optimizer, warmup: int = 3) -> Callable[[], Any]:
    """A capturable optimizer's step captured in a CUDA graph (after ``warmup`` eager steps on
    a side stream, as torch asks): returns the graph's ``replay``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            optimizer.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        optimizer.step()
    return graph.replay


def _sync_free(step: Callable[[], Any]) -> bool:
    """True if ``step`` ran under ``torch.cuda.set_sync_debug_mode("error")``."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError:
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return True


def _extra_memory_mb(step: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


@contextmanager
def _quiet_compile_notices() -> Iterator[None]:
    """Silence the compiled step's notices that say nothing about the measurement (the step's
    profiler range is dropped from the graph; no CUDA toolkit on a CPU machine)."""
    loggers = [logging.getLogger(name) for name in ("torch._dynamo", "torch.utils.cpp_extension")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def measure(
    names: Sequence[str], shapes: Sequence[torch.Size], device: str, repeats: int
) -> list[Result]:
    """Build every optimizer on its own copy of the parameters, then time them interleaved.

    Steps run round-robin (A B C ... A B C ...), so every optimizer meets the same machine state:
    on CPU the cost of a step depends on whether the allocator recycles the memory of
    temporaries or returns it to the OS (page faults on the next step), which drifts with what
    else the process allocated.
    """
    cuda = device.startswith("cuda")
    steps: dict[str, Callable[[], Any]] = {}
    results: dict[str, Result] = {}
    for name in names:
        params = make_params(shapes, device)
        optimizer = OPTIMIZERS[name](params)
        step: Callable[[], Any] = optimizer.step
        compile_s = None
        compiled = name.endswith(" compiled")
        if name.endswith(" graph"):
            start = time.perf_counter()
            step = captured(optimizer)
            _sync(device)
            compile_s = time.perf_counter() - start
        if compiled:  # compiled=True: the first step compiles, once for the run
            start = time.perf_counter()
            with _quiet_compile_notices():
                for _ in range(3):
                    step()
            _sync(device)
            compile_s = time.perf_counter() - start
        step()  # warm-up: lazy state
        _sync(device)
        ops = syncs = None
        if not compiled:  # a dispatch mode would re-trace the compiled graph
            counter = OpCounter()
            with counter:
                step()
            ops, syncs = counter.total, counter.host_syncs
        result = Result(name, 0.0, ops, syncs, _state_ratio(optimizer, params), compile_s=compile_s)
        if cuda:
            result.kernels = count_kernels(step)
            result.extra_memory_mb = _extra_memory_mb(step)
            if name.startswith(OURS):
                result.sync_free = _sync_free(step)
        steps[name], results[name] = step, result
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    for name in names:
        results[name].median_ms = 1e3 * statistics.median(times[name])
    return [results[name] for name in names]


def _measure_with_threads(
    names: Sequence[str], shapes: Sequence[torch.Size], device: str, repeats: int, threads: int
) -> list[Result]:
    torch.set_num_threads(threads)
    return measure(names, shapes, device, repeats)


def measure_in_processes(
    names: Sequence[str],
    shapes: Sequence[torch.Size],
    device: str,
    repeats: int,
    processes: int,
) -> list[Result]:
    """:func:`measure` in ``processes`` fresh processes (spawned one after the other, with this
    process's thread count), combined by :func:`combine`."""
    context = multiprocessing.get_context("spawn")
    threads = torch.get_num_threads()
    runs = []
    for _ in range(processes):
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            args = (names, shapes, device, repeats, threads)
            runs.append(pool.submit(_measure_with_threads, *args).result())
    return combine(runs)


def combine(runs: Sequence[Sequence[Result]]) -> list[Result]:
    """One result per optimizer from several processes' results: the median of the medians
    (and of the compile times), with each process's median kept for the paired ratios."""
    combined = []
    for results in zip(*runs, strict=True):
        medians = tuple(r.median_ms for r in results)
        compile_s = [r.compile_s for r in results if r.compile_s is not None]
        combined.append(
            replace(
                results[0],
                median_ms=statistics.median(medians),
                process_ms=medians,
                compile_s=statistics.median(compile_s) if compile_s else None,
            )
        )
    return combined


def _cell(value: object, fmt: str = "{}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _ratio_cell(row: Result, reference: Result | None, spread: bool = False) -> str:
    """``row``'s paired ratio to ``reference`` (n/a when not measured), with its range."""
    if reference is None:
        return "n/a"
    text = f"{row.ratio(reference):.2f}x"
    bounds = row.ratio_range(reference) if spread else None
    return text + (f" ({bounds[0]:.2f}-{bounds[1]:.2f})" if bounds else "")


def markdown(results: dict[str, list[Result]], device: str, environment: str) -> str:
    """One table per parameter set. Ratios are paired (:meth:`Result.ratio`); the ``vs TVLARS``
    column, which says whether TVLARS is ahead, also shows their range over processes."""
    cuda = device.startswith("cuda")
    lines = [f"## Optimizer step on {device}", "", environment, ""]
    for param_set, rows in results.items():
        by_name = {r.optimizer: r for r in rows}
        foreach, fused, tvlars = (by_name.get(n) for n in ("SGD foreach", "SGD fused", "TVLARS"))
        head = "| optimizer | median step (ms) | vs SGD foreach | vs SGD fused | vs TVLARS "
        head += "| ops / step | " + ("kernels / step | extra memory (MB) | " if cuda else "")
        head += "host syncs / step | state / params |"
        lines += [
            f"### {param_set} ({len(parameter_shapes(param_set))} tensors)",
            "",
            head,
            "|---|" + "---:|" * (9 if cuda else 7),
        ]
        for r in rows:
            extra = f" (compile {r.compile_s:.0f} s)" if r.compile_s is not None else ""
            if r.compile_s is not None and r.optimizer.endswith(" graph"):
                extra = f" (capture {r.compile_s:.2f} s)"
            syncs = _cell(r.host_syncs)
            if r.sync_free is not None:
                syncs += " (sync-debug: " + ("none" if r.sync_free else "SYNC") + ")"
            spread = (
                f" ({min(r.process_ms):.3f}-{max(r.process_ms):.3f})"
                if len(r.process_ms) > 1
                else ""
            )
            cells = [
                f"{r.optimizer}{extra}",
                f"{r.median_ms:.3f}{spread}",
                _ratio_cell(r, foreach),
                _ratio_cell(r, fused),
                "" if r is tvlars else _ratio_cell(r, tvlars, spread=True),
                _cell(r.ops),
            ]
            if cuda:
                cells += [_cell(r.kernels), _cell(r.extra_memory_mb, "{:.0f}")]
            cells += [syncs, f"{r.state_ratio:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", *_lamb_summary(by_name)]
    return "\n".join(lines)


def _lamb_summary(by_name: dict[str, Result]) -> list[str]:
    """The LAMB ratios the targets are stated in: LAMB / TVLARS and timm's Lamb / LAMB."""
    lamb, tvlars, timm = (by_name.get(n) for n in ("LAMB", "TVLARS", "timm Lamb"))
    if lamb is None:
        return []
    parts = []
    if tvlars is not None:
        parts.append(f"LAMB takes {_ratio_cell(lamb, tvlars, spread=True)} TVLARS's step")
    if timm is not None:
        parts.append(f"timm's Lamb takes {_ratio_cell(timm, lamb, spread=True)} LAMB's")
    return ["; ".join(parts) + ".", ""]


def plot(results: dict[str, list[Result]], device: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False)
    for ax, (param_set, rows) in zip(axes[0], results.items(), strict=True):
        base = next(r for r in rows if r.optimizer == "SGD foreach")
        ratios = [r.ratio(base) for r in rows]
        colors = ["tab:green" if r.optimizer.startswith(OURS) else "tab:gray" for r in rows]
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


def environment(device: str, repeats: int, processes: int = 1) -> str:
    text = (
        f"torch {torch.__version__}, "
        f"{' '.join(filter(None, (platform.machine(), platform.processor())))}, "
        f"{torch.get_num_threads()} CPU thread(s)"
    )
    if device.startswith("cuda"):
        text += f", {torch.cuda.get_device_name()}"
    text += f"; median of {repeats} interleaved steps"
    if processes > 1:
        text += (
            f" in each of {processes} fresh processes: the median of the medians (range); "
            "ratios are taken per process, then their median (vs TVLARS: and their range)"
        )
    text += "; vs TVLARS above 1: slower than TVLARS"
    if processes > 1:
        text += "; compile: the median over processes (Inductor's disk cache warm after the first)"
    return text


def main(argv: Sequence[str] | None = None) -> None:
    parser = OneLineArgumentParser(
        prog="lightning-tvlars bench-step", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--device",
        type=device_argument,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the parameters live (default: cuda when available, else cpu)",
    )
    parser.add_argument(
        "--sets",
        nargs="+",
        default=["resnet50", "vit_b_16", "lm"],
        choices=PARAMETER_SETS,
        help="parameter sets (default: resnet50 vit_b_16 lm)",
    )
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=None,
        choices=list(OPTIMIZERS),
        help="SGD foreach, the reference of the ratios, is always measured (default: "
        f"{', '.join(DEFAULT_OPTIMIZERS)}, and on CUDA {', '.join(GRAPHED)})",
    )
    parser.add_argument(
        "--repeats",
        type=int_argument(1),
        default=20,
        help="timed steps per optimizer, interleaved (default: 20)",
    )
    parser.add_argument(
        "--processes",
        type=int_argument(1),
        default=1,
        help="measure in this many fresh processes: median of their medians with the range, "
        "ratios paired per process (default: 1, this process)",
    )
    parser.add_argument(
        "--threads", type=int_argument(1), default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write step_<device>.md/.png here")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.optimizers is None:
        args.optimizers = [*DEFAULT_OPTIMIZERS, *(GRAPHED if cuda else ())]
    graphs = [name for name in args.optimizers if name.endswith(" graph")]
    if graphs and not cuda:
        parser.error(f"{', '.join(graphs)} capture a CUDA graph: they need --device cuda")
    missing = missing_bench_modules(
        (name, NEEDS[name]) for name in args.optimizers if name in NEEDS
    )
    if missing:
        parser.error(missing + ", or choose others with --optimizers")
    if args.threads:
        torch.set_num_threads(args.threads)
    if "SGD foreach" not in args.optimizers:
        args.optimizers.insert(0, "SGD foreach")
    device_name = args.device.split(":")[0]
    setup = environment(args.device, args.repeats, args.processes)
    results: dict[str, list[Result]] = {}
    for param_set in args.sets:
        shapes = parameter_shapes(param_set)
        if args.processes > 1:
            results[param_set] = measure_in_processes(
                args.optimizers, shapes, args.device, args.repeats, args.processes
            )
        else:
            results[param_set] = measure(args.optimizers, shapes, args.device, args.repeats)
        for r in results[param_set]:
            print(
                f"{param_set:>9} {r.optimizer:>18}: {r.median_ms:9.3f} ms  ops {_cell(r.ops):>5}  "
                f"kernels {_cell(r.kernels):>5}  syncs {_cell(r.host_syncs):>3}",
                flush=True,
            )
        text = markdown(results, device_name, setup)
        if args.out:  # after every set: an interrupted run keeps what it measured
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"step_{device_name}.md").write_text(text)
            plot(results, device_name, args.out / f"step_{device_name}.png")
    print(text)


if __name__ == "__main__":
    main()
