"""PyTorch reference for the speed comparison: the same model, loss and optimizer.

    python dks_jax/tools/torch_reference.py --model resnet50 --aux none --method baseline \
        --batch_size 256 --image_size 224 --dtype bfloat16 --json_out /tmp/torch.json
    python dks_jax/tools/torch_reference.py --model cifar_resnet32 --aux paper --params_only

A standalone script (PyTorch and the standard library only, hence argparse, not absl): it runs in a
PyTorch environment that need not have dks_jax's dependencies (``make torch-env``).
``benchmark.py --compare_torch`` runs it in a subprocess, as a server (``--serve``, below).

Models (:data:`MODELS`: name -> the ``--aux`` values it has):

- ImageNet ResNets in torchvision's layout. ``--aux none`` uses ``torchvision.models.<name>`` when
  torchvision is importable (``--impl auto``), else this file's own ResNet (the same layers and
  initialisation). ``--aux paper`` is this file's ResNet with the DKS paper's auxiliary branches,
  exactly those of ``dks_jax/models/imagenet_resnet.py`` (DKS supplement Table 7): C2 forks after
  conv4_x and runs a conv5_x-like stage of ``c2`` blocks at 1024 planes (stride 2); C3 forks after
  conv3_x and runs conv4_x-like ``c3[0]`` blocks at 256 planes and conv5_x-like ``c3[1]`` blocks at
  512 planes (stride 2 each); each ends in global average pooling and a fully connected layer. The
  blocks are the backbone's own (BasicBlock for ResNet-18/34, Bottleneck for 50/101/152).
  ResNet-18: c2 = 2, c3 = (1, 2) -> 53,483,512 parameters at 1000 classes, as dks_jax counts.
- He et al.'s CIFAR ResNets (``cifar_resnet8/14/20/32/110``, 6n+2 layers), as
  ``dks_jax/models/cifar_resnet.py`` builds them: a 3x3 conv-BN-ReLU stem at 16 channels; stages
  conv2_x, conv3_x, conv4_x of n basic blocks at 16, 32, 64 channels (strides 1, 2, 2); global
  average pooling and fc. Shortcuts are parameter-free (option A, dks_jax's default
  ``shortcut="subsample"``): the input subsampled with the block's stride, the new channels zeros.
  ``--aux paper``: C2 forks after conv3_x and runs a conv4_x-like stage of ``c2`` blocks at 128
  channels (stride 2); C3 forks after conv2_x and runs ``c3[0]`` blocks at 32 and ``c3[1]`` blocks
  at 64 channels (stride 2 each); ``--aux narrow`` is the same at half the widths (C2 at 64, C3 at
  16 and 32; DKS Table 6). Each branch ends in global average pooling and fc. The blocks and
  branch depths are dks_jax's (:data:`CIFAR_RESNETS`); the parameter counts are equal to
  ``dks_jax.models.complexity`` (ResNet-32, paper: 2,124,334 at 10 classes), which a test checks.

Initialisation (both families): convolutions Kaiming normal (fan_out, ReLU gain), BatchNorm
weight 1 and bias 0, fully connected layers PyTorch's default, as dks_jax.

Heads order as in dks_jax: (main C1, C2, C3). Loss (``--method``): ``baseline`` = CE of the main
head; ``ds`` = CE of every head (alpha = 1); ``dks`` = ``ds`` + the bidirectional synergy term
sum over ordered pairs (m, n), m != n, of mean_b H(softmax(z_m).detach(), softmax(z_n)) (beta = 1,
T = 1), computed in float32 from the logits. Optimizer: SGD, momentum 0.9, weight decay 1e-4 (coupled,
as ``torch.optim.SGD``), lr 0.1; fused on CUDA.

Speed settings: ``torch.compile`` of model + loss (``--compile auto``: on for CUDA, off on CPU),
channels_last activations and weights, bf16 autocast (``--dtype bfloat16``), cuDNN benchmark mode,
``torch.set_num_threads`` to the cores this process may run on (``--num_threads 0``; XLA:CPU uses
them all too; the result records ``torch.get_num_threads()``).
Timing as the JAX side: synthetic normal images and uniform labels already on the device (rotating
over ``--num_batches`` batches), ``--warmup`` untimed steps (the first one compiles: ``compile_s`` is
its wall time), then ``--steps`` steps each timed from launch to ``torch.cuda.synchronize()``;
the median is reported. Runs on CPU at tiny sizes (no compile, float32) for tests.

``--serve``: build and warm up as above, then answer commands on stdin, one per line, with one JSON
line each on stdout (anything else the process prints goes to stderr):
``{"event": "ready", ...}`` once warmed up; ``run N`` -> ``{"event": "times", "times": [N step
seconds]}``; ``done`` (or end of input) -> ``{"event": "result", ...}``, the result over every
``run`` (each one a round: ``step_ms`` the median over all their steps, ``step_ms_rounds`` the
median of each), then the process exits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

# name -> (block, blocks per stage, paper branches (c3, c2)); mirrors dks_jax/models/imagenet_resnet.py
RESNETS = {
    "resnet18": ("basic", (2, 2, 2, 2), ((1, 2), 2)),
    "resnet34": ("basic", (3, 4, 6, 3), ((3, 2), 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3), ((3, 2), 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3), ((12, 2), 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3), ((18, 2), 3)),
}
# name -> (n blocks per stage, {aux: branch depths (c3, c2)}); mirrors dks_jax/models/cifar_resnet.py
CIFAR_RESNETS = {
    "cifar_resnet8": (1, {"paper": ((1, 1), 1), "narrow": ((1, 1), 1)}),
    "cifar_resnet14": (2, {"paper": ((2, 1), 2), "narrow": ((2, 1), 2)}),
    "cifar_resnet20": (3, {"paper": ((3, 2), 3), "narrow": ((3, 2), 3)}),
    "cifar_resnet32": (5, {"paper": ((5, 3), 5), "narrow": ((5, 3), 5)}),
    "cifar_resnet110": (18, {"paper": ((9, 9), 18)}),
}
CIFAR_WIDTHS = (16, 32, 64)
# aux -> (C2's width, C3's two widths): cifar_resnet.py's _paper and _narrow
CIFAR_BRANCH_WIDTHS = {"paper": (128, (32, 64)), "narrow": (64, (16, 32))}
# Every model -> the --aux values it has.
MODELS = {
    **{name: ("none", "paper") for name in RESNETS},
    **{name: ("none", *designs) for name, (_, designs) in CIFAR_RESNETS.items()},
}
METHODS = ("baseline", "ds", "dks")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _projection(in_ch, planes, stride)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        r = x if self.downsample is None else self.downsample(x)
        return F.relu(y + r)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * 4
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5: stride on the 3x3
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = _projection(in_ch, out, stride)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        r = x if self.downsample is None else self.downsample(x)
        return F.relu(y + r)


def _projection(in_ch: int, out: int, stride: int):
    if stride == 1 and in_ch == out:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out, 1, stride, bias=False), nn.BatchNorm2d(out))


def _stage(block, in_ch: int, planes: int, blocks: int, stride: int) -> tuple[nn.Sequential, int]:
    layers = []
    for i in range(blocks):
        layers.append(block(in_ch, planes, stride if i == 0 else 1))
        in_ch = planes * block.expansion
    return nn.Sequential(*layers), in_ch


class Head(nn.Module):
    """An auxiliary classifier: stages of the backbone's block, global average pooling, fc."""

    def __init__(self, block, in_ch: int, stages, num_classes: int):
        super().__init__()
        mods = []
        for planes, blocks in stages:
            stage, in_ch = _stage(block, in_ch, planes, blocks, 2)
            mods.append(stage)
        self.stages = nn.Sequential(*mods)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.stages(x), 1), 1))


class CifarBlock(nn.Module):
    """He et al.'s CIFAR basic block: conv3x3-BN-ReLU-conv3x3-BN + option-A shortcut, ReLU.

    The shortcut has no parameters: the input subsampled with the stride (``x[..., ::s, ::s]``), the
    new channels zeros (dks_jax ``cifar_resnet.BasicBlock``, ``shortcut="subsample"``).
    """

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1):
        super().__init__()
        if planes < in_ch:
            raise ValueError(f"a zero-padding shortcut cannot shrink {in_ch} -> {planes}")
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.extra = stride, planes - in_ch

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        r = x[:, :, :: self.stride, :: self.stride] if self.stride != 1 else x
        if self.extra:
            r = F.pad(r, (0, 0, 0, 0, 0, self.extra))  # keeps channels_last
        return F.relu(y + r)


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2); ``aux="paper"``/``"narrow"`` add dks_jax's branches and
    return all heads (main, C2, C3)."""

    def __init__(self, name: str, num_classes: int, aux: str = "none"):
        super().__init__()
        n, designs = CIFAR_RESNETS[name]
        self.conv1 = nn.Conv2d(3, CIFAR_WIDTHS[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(CIFAR_WIDTHS[0])
        self.layer1, ch1 = _stage(CifarBlock, CIFAR_WIDTHS[0], CIFAR_WIDTHS[0], n, 1)
        self.layer2, ch2 = _stage(CifarBlock, ch1, CIFAR_WIDTHS[1], n, 2)
        self.layer3, ch = _stage(CifarBlock, ch2, CIFAR_WIDTHS[2], n, 2)
        self.fc = nn.Linear(ch, num_classes)
        self.aux = aux
        if aux != "none":
            if aux not in designs:
                raise ValueError(f"{name} has aux {MODELS[name]}, not {aux!r}")
            (c3a, c3b), c2 = designs[aux]
            w2, (w3a, w3b) = CIFAR_BRANCH_WIDTHS[aux]
            self.c2 = Head(CifarBlock, ch2, [(w2, c2)], num_classes)  # after conv3_x
            self.c3 = Head(CifarBlock, ch1, [(w3a, c3a), (w3b, c3b)], num_classes)  # after conv2_x
        _init(self)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        x = self.layer3(f2)
        main = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        if self.aux == "none":
            return (main,)
        return main, self.c2(f2), self.c3(f1)


def _init(model: nn.Module) -> None:
    """torchvision's ResNet initialisation (dks_jax's too): Kaiming-normal fan_out convolutions,
    BatchNorm 1 / 0; fully connected layers keep PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNet(nn.Module):
    """torchvision-layout ResNet; ``aux="paper"`` adds the DKS branches and returns all heads."""

    def __init__(self, name: str, num_classes: int, aux: str = "none"):
        super().__init__()
        kind, depths, (c3, c2) = RESNETS[name]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        ch = 64
        self.layer1, ch = _stage(block, ch, 64, depths[0], 1)
        self.layer2, ch2 = _stage(block, ch, 128, depths[1], 2)
        self.layer3, ch3 = _stage(block, ch2, 256, depths[2], 2)
        self.layer4, ch = _stage(block, ch3, 512, depths[3], 2)
        self.fc = nn.Linear(ch, num_classes)
        self.aux = aux
        if aux == "paper":
            self.c2 = Head(block, ch3, [(1024, c2)], num_classes)
            self.c3 = Head(block, ch2, [(256, c3[0]), (512, c3[1])], num_classes)
        elif aux != "none":
            raise ValueError(f"aux must be 'none' or 'paper', got {aux!r}")
        _init(self)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer1(x)
        f2 = self.layer2(x)
        f3 = self.layer3(f2)
        x = self.layer4(f3)
        main = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        if self.aux == "none":
            return (main,)
        return main, self.c2(f3), self.c3(f2)


def create_model(name: str, num_classes: int, aux: str = "none", impl: str = "auto"):
    """``(model, impl)``: torchvision's model for an ImageNet ResNet with ``aux="none"`` when
    available (impl auto), else ours (always for the CIFAR ResNets)."""
    if name not in MODELS:
        raise ValueError(f"no PyTorch reference for {name!r}; have {', '.join(MODELS)}")
    if aux not in MODELS[name]:
        raise ValueError(f"{name} has aux {MODELS[name]}, not {aux!r}")
    if impl not in ("auto", "torchvision", "own"):
        raise ValueError(f"impl must be auto, torchvision or own, got {impl!r}")
    if name in CIFAR_RESNETS:
        if impl == "torchvision":
            raise ValueError(f"torchvision has no {name}: use --impl own or auto")
        return CifarResNet(name, num_classes, aux), "own"
    if aux == "none" and impl != "own":
        try:
            import torchvision
        except ImportError:
            if impl == "torchvision":
                raise
        else:
            return getattr(torchvision.models, name)(num_classes=num_classes), "torchvision"
    return ResNet(name, num_classes, aux), "own"


def objective(logits, labels, method: str) -> torch.Tensor:
    """The loss of ``method`` on a tuple of logits (heads order: main first), in float32."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    logits = [z.float() for z in logits]
    loss = F.cross_entropy(logits[0], labels)
    if method == "baseline":
        return loss
    for z in logits[1:]:
        loss = loss + F.cross_entropy(z, labels)
    if method == "dks":
        log_p = [F.log_softmax(z, dim=-1) for z in logits]
        for m, teacher in enumerate(log_p):
            target = teacher.detach().exp()
            for n, student in enumerate(log_p):
                if m != n:
                    loss = loss - (target * student).sum(-1).mean()
    return loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def defaults(args) -> argparse.Namespace:
    """``args`` with the model-dependent defaults filled in (image size, classes, threads)."""
    cifar = args.model in CIFAR_RESNETS
    args = argparse.Namespace(**vars(args))
    args.image_size = args.image_size or (32 if cifar else 224)
    args.num_classes = args.num_classes or (10 if cifar else 1000)
    args.num_threads = args.num_threads or available_cores()
    return args


def parameter_counts(model: nn.Module) -> dict:
    """``num_params`` (every parameter; BatchNorm's running statistics are buffers) and the counts
    of the main path and of each branch, heads order (C2, C3), as ``models.complexity`` splits them."""
    branches = [getattr(model, name) for name in ("c2", "c3") if hasattr(model, name)]
    per_branch = [sum(p.numel() for p in b.parameters()) for b in branches]
    total = sum(p.numel() for p in model.parameters())
    return {"num_params": total, "num_params_main": total - sum(per_branch),
            "num_params_branches": per_branch}


class Bench:
    """Model, loss, optimizer and batches on the device, warmed up; :meth:`timed` runs steps."""

    def __init__(self, args) -> None:
        args = defaults(args)
        self.args = args
        torch.set_num_threads(args.num_threads)
        torch.manual_seed(args.seed)
        device = torch.device(args.device if args.device != "auto"
                              else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.device = device
        self.use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
        bf16 = args.dtype == "bfloat16"
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.cuda.reset_peak_memory_stats(device)

        model, self.impl = create_model(args.model, args.num_classes, args.aux, args.impl)
        self.counts = parameter_counts(model)
        model = model.to(device=device, memory_format=fmt).train()
        opt_kwargs = {"fused": True} if device.type == "cuda" else {}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4,
                                    **opt_kwargs)

        def forward_loss(images, labels):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(images)
            if isinstance(logits, torch.Tensor):
                logits = (logits,)
            return objective(logits, labels, args.method)

        if self.use_compile:
            forward_loss = torch.compile(forward_loss, mode=args.compile_mode)

        def step(images, labels):
            loss = forward_loss(images, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss

        self.step = step
        gen = torch.Generator(device=device).manual_seed(args.seed + 1)
        shape = (args.batch_size, 3, args.image_size, args.image_size)
        self.batches = [
            (torch.randn(shape, device=device, generator=gen).contiguous(memory_format=fmt),
             torch.randint(0, args.num_classes, (args.batch_size,), device=device, generator=gen))
            for _ in range(args.num_batches)
        ]
        _sync(device)

        start = time.perf_counter()
        loss = step(*self.batches[0])
        _sync(device)
        self.compile_s = time.perf_counter() - start
        for i in range(1, args.warmup):
            loss = step(*self.batches[i % args.num_batches])
        _sync(device)
        self.loss_first = float(loss.detach())
        if not math.isfinite(self.loss_first):
            raise FloatingPointError(f"non-finite loss {self.loss_first} during warm-up")
        self.loss = loss
        self.next_batch = 0
        self.rounds: list[list[float]] = []

    def timed(self, steps: int) -> list[float]:
        """Runs ``steps`` steps, each timed from launch to sync; one round of the result."""
        times = []
        for _ in range(steps):
            batch = self.batches[self.next_batch % len(self.batches)]
            self.next_batch += 1
            start = time.perf_counter()
            self.loss = self.step(*batch)
            _sync(self.device)
            times.append(time.perf_counter() - start)
        self.rounds.append(times)
        return times

    def info(self) -> dict:
        """What the result says besides the step times."""
        args, device = self.args, self.device
        try:
            import torchvision

            tv_version = torchvision.__version__
        except ImportError:
            tv_version = None
        return {
            "torch_version": torch.__version__,
            "torchvision_version": tv_version,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "impl": self.impl,
            "model": args.model,
            "aux": args.aux,
            "method": args.method,
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "num_classes": args.num_classes,
            "dtype": args.dtype,
            "compile": self.use_compile,
            "compile_mode": args.compile_mode if self.use_compile else None,
            "channels_last": args.channels_last,
            "warmup": args.warmup,
            "num_threads": torch.get_num_threads(),
            "num_interop_threads": torch.get_num_interop_threads(),
            "available_cores": available_cores(),
            **self.counts,
            "compile_s": self.compile_s,
            "loss_first": self.loss_first,
        }

    def result(self) -> dict:
        """:meth:`info` and the step times of every round so far (median over all of them)."""
        times = [t for r in self.rounds for t in r]
        if not times:
            raise ValueError("no timed steps")
        step_s = statistics.median(times)
        return {
            **self.info(),
            "steps": len(self.rounds[0]),
            "rounds": len(self.rounds),
            "images_per_sec": self.args.batch_size / step_s,
            "step_ms": 1e3 * step_s,
            "step_ms_min": 1e3 * min(times),
            "step_ms_rounds": [1e3 * statistics.median(r) for r in self.rounds],
            "peak_memory_bytes": (torch.cuda.max_memory_allocated(self.device)
                                  if self.device.type == "cuda" else None),
            "loss_last": float(self.loss.detach()),
        }


def benchmark(args) -> dict:
    """Builds model, loss and optimizer, and times ``args.steps`` training steps on synthetic data."""
    bench = Bench(args)
    bench.timed(args.steps)
    return bench.result()


def serve(args, commands=sys.stdin, out=None) -> dict:
    """The ``--serve`` loop (module docstring): JSON lines to ``out`` (default: the real stdout,
    with Python's and the C libraries' own stdout sent to stderr, so nothing else lands there)."""
    if out is None:
        out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
        sys.stdout.flush()
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def send(event: str, **fields) -> None:
        out.write(json.dumps({"event": event, **fields}) + "\n")
        out.flush()

    bench = Bench(args)
    send("ready", **bench.info())
    for line in commands:
        words = line.split()
        if not words:
            continue
        if words[0] == "run" and len(words) == 2 and words[1].isdigit() and int(words[1]) > 0:
            send("times", times=bench.timed(int(words[1])))
        elif words[0] == "done":
            break
        else:
            send("error", message=f"unknown command {line.strip()!r}: run N | done")
    result = bench.result() if bench.rounds else bench.info()
    send("result", **result)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", choices=sorted(MODELS))
    p.add_argument("--aux", default="none", choices=["none", "paper", "narrow"],
                   help="branches: paper (every model), narrow (CIFAR ResNet-8 to -32)")
    p.add_argument("--method", default="baseline", choices=METHODS)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--image_size", type=int, default=0, help="0: 32 for CIFAR models, else 224")
    p.add_argument("--num_classes", type=int, default=0, help="0: 10 for CIFAR models, else 1000")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--num_batches", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.add_argument("--num_threads", type=int, default=0,
                   help="torch.set_num_threads; 0: the cores this process may run on")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--compile_mode", default="default",
                   help="torch.compile mode: default, max-autotune, max-autotune-no-cudagraphs")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--impl", default="auto", choices=["auto", "torchvision", "own"])
    p.add_argument("--json_out", default="", help="write the result here as JSON")
    p.add_argument("--serve", action="store_true",
                   help="answer 'run N' / 'done' on stdin with JSON lines (module docstring)")
    p.add_argument("--params_only", action="store_true",
                   help="build the model and report its parameter counts only (no timing)")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.num_batches < 1:
        p.error("--warmup, --steps and --num_batches must be at least 1")
    if args.aux not in MODELS[args.model]:
        p.error(f"{args.model} has --aux {', '.join(MODELS[args.model])}, not {args.aux}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.params_only:
        a = defaults(args)
        model, impl = create_model(a.model, a.num_classes, a.aux, a.impl)
        result = {"model": a.model, "aux": a.aux, "num_classes": a.num_classes, "impl": impl,
                  "torch_version": torch.__version__, **parameter_counts(model)}
    elif args.serve:
        result = serve(args)
    else:
        result = benchmark(args)
    result["python_version"] = platform.python_version()
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)
    if args.params_only:
        if not args.json_out:
            print(json.dumps(result, sort_keys=True))
        return result
    if "step_ms" in result:
        print(f"PyTorch {result['torch_version']} {result['model']} aux={result['aux']} "
              f"method={result['method']} batch={result['batch_size']} {result['image_size']}px "
              f"{result['dtype']} on {result['device']} ({result['impl']}, "
              f"compile={result['compile']}, {result['num_threads']} threads): "
              f"{result['images_per_sec']:.1f} images/s, {result['step_ms']:.2f} ms/step, "
              f"first step {result['compile_s']:.1f} s", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
