"""Cost of a MIMM-X training step next to an ERM step, on the brain bundle's network.

Both methods train the ``mimmx_brain`` network (3D ResNet-10, parts age_group / sex / cohort of 16
features, two confounders) through the same :class:`~mimm_med.engines.MIMMXTrainer` iteration on a
fixed batch, from the same initial weights, with the bundle's optimizers. An ERM step is forward,
backward and optimizer step; a MIMM-X step adds ``n_critic`` critic steps on the detached features,
the MI terms, the two gradients at the shared layer behind the MI clipping and GradNorm's per-task
gradients and weight step. Steps of the methods alternate, so that load from other processes hits
them alike; the table gives the median milliseconds per step after warm-up, volumes per second and
the ratio MIMM-X / ERM (target ≤ 1.3). ``--breakdown`` adds MIMM-X without critic steps and MIMM
without critic steps, which split the overhead into critic steps, MIMM-X's additions (attention, MI
clipping, GradNorm) and the MI terms themselves.

On CUDA the default is the bundle's 96³ volumes, timed with and without AMP::

    python benchmarks/step_overhead.py                            # CPU: 32³ volumes, batch 4
    python benchmarks/step_overhead.py --spatial-size 24 --breakdown --threads 1
    python benchmarks/step_overhead.py --device cuda --batch-size 8 --json step_overhead.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from mimm_med.cli import at_least, output_file, torch_device
from mimm_med.data.writers import write_json
from mimm_med.engines import MIMMXObjective, MIMMXTrainer
from mimm_med.networks import MIMMXNet

#: Parts of the mimmx_brain bundle's network: the primary task and two confounders.
PARTS = {"age_group": 16, "sex": 16, "cohort": 16}
TARGET_RATIO = 1.3


@dataclass(frozen=True)
class Variant:
    """One row of the table: a method and its number of critic steps."""

    method: str
    n_critic: int

    @property
    def label(self) -> str:
        return self.method if self.method == "erm" else f"{self.method} (n_critic={self.n_critic})"


@dataclass
class StepTiming:
    label: str
    method: str
    n_critic: int
    amp: bool
    median_ms: float
    min_ms: float
    volumes_per_s: float


def brain_network() -> MIMMXNet:
    """The network of ``bundles/mimmx_brain/configs/train.json``."""
    return MIMMXNet("resnet10", PARTS, dict.fromkeys(PARTS, 2), spatial_dims=3, in_channels=1)


def fixed_batch(batch_size: int, spatial_size: tuple[int, int, int], device: torch.device) -> dict[str, torch.Tensor]:
    """Random volumes; every factor has both classes, independently of the others."""
    generator = torch.Generator().manual_seed(0)
    labels = {name: (torch.randperm(batch_size, generator=generator) % 2) for name in PARTS}
    image = torch.randn(batch_size, 1, *spatial_size, generator=generator)
    return {key: value.to(device) for key, value in {"image": image, **labels}.items()}


def make_trainer(
    network: MIMMXNet, variant: Variant, batch: dict[str, torch.Tensor], device: torch.device, amp: bool
) -> MIMMXTrainer:
    """A trainer with the bundle's objective and optimizers (λ = 1, MINE critics, AdamW / Adam)."""
    objective = MIMMXObjective.for_network(variant.method, network)
    critic_parameters = objective.critic_parameters()
    return MIMMXTrainer(
        device,
        1,
        [batch],
        network,
        torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=0.01),
        objective,
        torch.optim.Adam(critic_parameters, lr=1e-3) if critic_parameters else None,
        torch.optim.Adam(objective.gradnorm.parameters(), lr=0.025) if objective.gradnorm is not None else None,
        n_critic=variant.n_critic,
        amp=amp,
    )


def time_steps(
    trainers: dict[Variant, MIMMXTrainer], batch: dict[str, torch.Tensor], steps: int, warmup: int
) -> dict[Variant, list[float]]:
    """Seconds per step of each trainer; the trainers take turns, ``warmup`` untimed rounds first."""
    device = batch["image"].device
    times: dict[Variant, list[float]] = {variant: [] for variant in trainers}
    for round_index in range(warmup + steps):
        for variant, trainer in trainers.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            trainer._iteration(trainer, batch)  # the engine's step function, without ignite's event loop
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_index >= warmup:
                times[variant].append(time.perf_counter() - start)
    return times


def measure(args: argparse.Namespace, amp: bool) -> list[StepTiming]:
    device = torch.device(args.device)
    batch = fixed_batch(args.batch_size, args.spatial_size, device)
    variants = [Variant("erm", 0), Variant("mimmx", args.n_critic)]
    if args.breakdown:
        variants += [Variant("mimmx", 0), Variant("mimm", 0)]
    torch.manual_seed(args.seed)
    initial = brain_network()
    trainers = {
        variant: make_trainer(copy.deepcopy(initial).to(device), variant, batch, device, amp) for variant in variants
    }
    times = time_steps(trainers, batch, args.steps, args.warmup)
    return [
        StepTiming(
            label=variant.label,
            method=variant.method,
            n_critic=variant.n_critic,
            amp=amp,
            median_ms=1000 * statistics.median(seconds),
            min_ms=1000 * min(seconds),
            volumes_per_s=args.batch_size / statistics.median(seconds),
        )
        for variant, seconds in times.items()
    ]


def ratio(timings: list[StepTiming], amp: bool, n_critic: int) -> float:
    by_label = {t.label: t for t in timings if t.amp == amp}
    return by_label[Variant("mimmx", n_critic).label].median_ms / by_label["erm"].median_ms


def print_table(timings: list[StepTiming], args: argparse.Namespace) -> None:
    size = "×".join(map(str, args.spatial_size))
    threads = f", {torch.get_num_threads()} thread(s)" if args.device == "cpu" else ""
    print(
        f"mimmx_brain network (3D ResNet-10, parts {'/'.join(PARTS)} × 16), {size} voxels, batch {args.batch_size}, "
        f"{args.device}{threads}; median of {args.steps} steps after {args.warmup} warm-up rounds\n"
    )
    width = max(len(t.label) for t in timings)
    print(f"{'amp':<4} {'method':<{width}} {'ms/step':>9} {'min ms':>9} {'volumes/s':>10}")
    for t in timings:
        amp = "on" if t.amp else "off"
        print(f"{amp:<4} {t.label:<{width}} {t.median_ms:9.1f} {t.min_ms:9.1f} {t.volumes_per_s:10.2f}")
    for amp in sorted({t.amp for t in timings}):
        value = ratio(timings, amp, args.n_critic)
        verdict = "ok" if value <= TARGET_RATIO else "above target"
        print(f"\nMIMM-X / ERM, amp {'on' if amp else 'off'}: {value:.2f} (target ≤ {TARGET_RATIO}: {verdict})")
    if args.breakdown:
        for amp in sorted({t.amp for t in timings}):
            ms = {t.label: t.median_ms for t in timings if t.amp == amp}
            full, no_critic = ms[Variant("mimmx", args.n_critic).label], ms[Variant("mimmx", 0).label]
            mimm, erm = ms[Variant("mimm", 0).label], ms["erm"]
            print(
                f"overhead over ERM, amp {'on' if amp else 'off'} (ms/step): {args.n_critic} critic steps "
                f"{full - no_critic:+.1f}, attention + MI clipping + GradNorm {no_critic - mimm:+.1f}, "
                f"MI terms and spurious heads {mimm - erm:+.1f}"
            )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--spatial-size", type=int, nargs="+", help="volume edge, or three sizes (default: 96 on CUDA, 32 on CPU)"
    )
    parser.add_argument("--batch-size", type=at_least(2), default=4)
    parser.add_argument(
        "--amp",
        choices=("off", "on", "both"),
        help="automatic mixed precision, CUDA only (default: both on CUDA, off on CPU)",
    )
    parser.add_argument("--n-critic", type=at_least(1), default=3, help="critic steps per MIMM-X step (the bundle's 3)")
    parser.add_argument("--steps", type=at_least(1), default=10, help="timed steps per method (median reported)")
    parser.add_argument("--warmup", type=at_least(0), default=3, help="untimed rounds first")
    parser.add_argument("--breakdown", action="store_true", help="also time MIMM-X and MIMM without critic steps")
    parser.add_argument("--threads", type=at_least(1), help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    parser.add_argument("--json", type=output_file, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    sizes = args.spatial_size or [96 if cuda else 32]
    if len(sizes) not in (1, 3):
        parser.error(f"--spatial-size takes one edge or three sizes, got {sizes}")
    args.spatial_size = tuple(sizes * 3 if len(sizes) == 1 else sizes)
    args.amp = args.amp or ("both" if cuda else "off")
    if args.amp != "off" and not cuda:
        parser.error("--amp on/both needs a CUDA device: MIMMXTrainer uses AMP on CUDA only")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    amp_settings = {"off": [False], "on": [True], "both": [False, True]}[args.amp]
    timings = [timing for amp in amp_settings for timing in measure(args, amp)]
    print_table(timings, args)
    if args.json:
        results = {
            "config": {key: value for key, value in vars(args).items() if key != "json"},
            "timings": [asdict(t) for t in timings],
            "ratio_mimmx_to_erm": {
                ("on" if amp else "off"): ratio(timings, amp, args.n_critic) for amp in amp_settings
            },
        }
        write_json(args.json, results)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
