"""Accuracy and speed of the mutual-information estimators in ``mimm_med.mi``.

Accuracy: each estimator's critic trains on fresh batches of correlated Gaussians whose MI is
known exactly (dims 8+8, batch 256), then estimates the MI of fresh batches; the table gives the
mean and standard deviation of those estimates at true MI 0, 1, 2 and 4 nats. The closed-form
Gaussian estimator has no critic: it only estimates, and it has no row in the speed table.

Speed: milliseconds per critic step (forward, backward, optimizer step) at dims 32+32 for batch
64, 256 and 1024, next to the reference critic of the public MIMM code, which concatenates every
pair (a_i, b_j) and pushes the B² rows through a 400-wide MLP with three BatchNorm hidden layers.

    python benchmarks/mi_estimators.py --json mi_estimators.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from mimm_med.cli import at_least, output_file
from mimm_med.data.writers import write_json
from mimm_med.mi import CLUB, ESTIMATORS, MINE, NWJ, CriticEstimator, InfoNCE, correlated_gaussians

TRUE_MI = (0.0, 1.0, 2.0, 4.0)
ACCURACY_DIM, ACCURACY_BATCH = 8, 256
SPEED_DIM, SPEED_BATCHES = 32, (64, 256, 1024)
QUADRATIC_CRITICS = ("MINE (concat)", "reference (B² rows)")


class ReferenceCritic(nn.Module):
    """The public MIMM critic: B² concatenated pairs through a 400-wide MLP with BatchNorm, DV loss."""

    def __init__(self, dim_a: int, dim_b: int, width: int = 400) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width_in in (dim_a + dim_b, width, width):
            layers += [nn.Linear(width_in, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
        self.layers = nn.Sequential(*layers, nn.Linear(width, 1))

    def critic_loss(self, a: Tensor, b: Tensor) -> Tensor:
        n = a.shape[0]
        pairs = torch.cat([a.repeat_interleave(n, dim=0), b.repeat(n, 1)], dim=1)
        scores = self.layers(pairs).reshape(n, n)
        negatives = scores.masked_fill(torch.eye(n, dtype=torch.bool, device=scores.device), -math.inf)
        return -(scores.diagonal().mean() - (torch.logsumexp(negatives.flatten(), 0) - math.log(n * (n - 1))))


@dataclass
class AccuracyResult:
    estimator: str
    true_mi: float
    mean: float
    std: float


@dataclass
class SpeedResult:
    critic: str
    batch: int
    ms_per_step: float | None


def estimate_accuracy(name: str, true_mi: float, args: argparse.Namespace) -> AccuracyResult:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed + 1)
    options = {"critic": args.critic} if issubclass(ESTIMATORS[name], CriticEstimator) else {}
    estimator = ESTIMATORS[name](ACCURACY_DIM, ACCURACY_DIM, **options)
    parameters = list(estimator.parameters())
    optimizer = torch.optim.Adam(parameters, lr=args.lr) if parameters else None
    for _ in range(args.steps if optimizer else 0):  # the closed-form Gaussian has no critic to train
        a, b = correlated_gaussians(ACCURACY_BATCH, ACCURACY_DIM, true_mi, generator)
        optimizer.zero_grad()
        estimator.critic_loss(a, b).backward()
        optimizer.step()
    with torch.no_grad():
        estimates = [
            float(estimator(*correlated_gaussians(ACCURACY_BATCH, ACCURACY_DIM, true_mi, generator)))
            for _ in range(args.eval_batches)
        ]
    return AccuracyResult(name, true_mi, statistics.mean(estimates), statistics.stdev(estimates))


def time_critic_step(critic: nn.Module, batch: int, args: argparse.Namespace) -> float:
    """Median milliseconds of one critic step after warm-up."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.Adam(critic.parameters(), lr=args.lr)
    a, b = correlated_gaussians(batch, SPEED_DIM, 1.0, generator)
    times = []
    for step in range(args.warmup_steps + args.timing_steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        critic.critic_loss(a, b).backward()
        optimizer.step()
        if step >= args.warmup_steps:
            times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)


def speed_candidates() -> dict[str, Callable[[], nn.Module]]:
    return {
        "MINE (separable)": lambda: MINE(SPEED_DIM, SPEED_DIM),
        "MINE (concat)": lambda: MINE(SPEED_DIM, SPEED_DIM, critic="concat"),
        "NWJ (separable)": lambda: NWJ(SPEED_DIM, SPEED_DIM),
        "InfoNCE (separable)": lambda: InfoNCE(SPEED_DIM, SPEED_DIM),
        "CLUB": lambda: CLUB(SPEED_DIM, SPEED_DIM),
        "reference (B² rows)": lambda: ReferenceCritic(SPEED_DIM, SPEED_DIM),
    }


def check_targets(accuracy: list[AccuracyResult], speed: list[SpeedResult], estimator_names: list[str]) -> list[dict]:
    found = {(r.estimator, r.true_mi): r.mean for r in accuracy}
    targets = []
    if "mine" in estimator_names:
        for true_mi in (1.0, 2.0):
            estimate = found[("mine", true_mi)]
            targets.append(
                {
                    "target": f"MINE within 10 % of {true_mi:g} nats",
                    "value": f"{estimate:.3f}",
                    "met": abs(estimate - true_mi) <= 0.1 * true_mi,
                }
            )
        estimate = found[("mine", 0.0)]
        targets.append(
            {
                "target": "MINE within 0.03 nats of 0 (independent)",
                "value": f"{estimate:.4f}",
                "met": abs(estimate) <= 0.03,
            }
        )
    if "club" in estimator_names:
        # At I = 0, "10 % below" is read with the same 0.03-nat tolerance as MINE's independence target.
        shortfalls = {mi: found[("club", mi)] - min(0.9 * mi, mi - 0.03) for mi in TRUE_MI}
        targets.append(
            {
                "target": "CLUB never more than 10 % below the truth",
                "value": ", ".join(f"{found[('club', mi)]:.3f}@{mi:g}" for mi in TRUE_MI),
                "met": all(shortfall >= 0 for shortfall in shortfalls.values()),
            }
        )
    timed = {(r.critic, r.batch): r.ms_per_step for r in speed}
    reference = timed.get(("reference (B² rows)", 256))
    fast = timed.get(("MINE (separable)", 256))
    if reference is not None and fast is not None:
        targets.append(
            {
                "target": "MINE critic step >= 20x faster than reference (B=256, 32+32)",
                "value": f"{reference / fast:.0f}x",
                "met": reference / fast >= 20,
            }
        )
    return targets


def print_accuracy(accuracy: list[AccuracyResult]) -> None:
    names = list(dict.fromkeys(r.estimator for r in accuracy))
    found = {(r.estimator, r.true_mi): r for r in accuracy}
    print(f"\nMI estimates on correlated Gaussians (dims {ACCURACY_DIM}+{ACCURACY_DIM}, batch {ACCURACY_BATCH}), nats")
    print(f"{'true MI':>10}" + "".join(f"{ESTIMATORS[name].__name__:>18}" for name in names))
    for true_mi in TRUE_MI:
        cells = "".join(f"{found[(name, true_mi)].mean:>10.3f} ± {found[(name, true_mi)].std:<5.3f}" for name in names)
        print(f"{true_mi:>10.1f}" + cells)


def print_speed(speed: list[SpeedResult]) -> None:
    critics = list(dict.fromkeys(r.critic for r in speed))
    timed = {(r.critic, r.batch): r.ms_per_step for r in speed}
    print(f"\nMilliseconds per critic step (forward + backward + Adam), dims {SPEED_DIM}+{SPEED_DIM}")
    print(f"{'critic':<22}" + "".join(f"{'B=' + str(batch):>12}" for batch in SPEED_BATCHES))
    for critic in critics:
        cells = "".join(
            f"{'skipped':>12}" if timed[(critic, batch)] is None else f"{timed[(critic, batch)]:>12.1f}"
            for batch in SPEED_BATCHES
        )
        print(f"{critic:<22}{cells}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=at_least(1), default=2000, help="critic steps per accuracy run (default 2000)")
    parser.add_argument(
        "--eval-batches", type=at_least(2), default=50, help="fresh batches the estimate is averaged over (>= 2: their sd is reported)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the critics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--critic",
        choices=("separable", "concat"),
        default="separable",
        help="critic of MINE/NWJ/InfoNCE in the accuracy runs",
    )
    parser.add_argument(
        "--estimators", nargs="+", type=str.lower, choices=tuple(ESTIMATORS), default=list(ESTIMATORS), help="case-insensitive"
    )
    parser.add_argument("--timing-steps", type=at_least(1), default=5, help="timed critic steps per cell (median reported)")
    parser.add_argument("--warmup-steps", type=at_least(0), default=2)
    parser.add_argument(
        "--quadratic-max-batch",
        type=at_least(1),
        default=256,
        help="largest batch timed for the critics whose cost grows with B² x width (concat, reference); "
        "at B=1024 the reference pushes 1M rows through its MLP and needs ~20 GB (default 256)",
    )
    parser.add_argument("--threads", type=at_least(1), help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--json", type=output_file, metavar="PATH", help="also write the results as JSON")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    accuracy: list[AccuracyResult] = []
    if not args.skip_accuracy:
        for name in args.estimators:
            for true_mi in TRUE_MI:
                accuracy.append(estimate_accuracy(name, true_mi, args))
                print(f"  {ESTIMATORS[name].__name__} at {true_mi:g} nats: {accuracy[-1].mean:.3f} ± {accuracy[-1].std:.3f}", flush=True)
        print_accuracy(accuracy)
    speed: list[SpeedResult] = []
    if not args.skip_speed:
        for critic_name, build in speed_candidates().items():
            for batch in SPEED_BATCHES:
                too_big = critic_name in QUADRATIC_CRITICS and batch > args.quadratic_max_batch
                torch.manual_seed(args.seed)
                milliseconds = None if too_big else time_critic_step(build(), batch, args)
                speed.append(SpeedResult(critic_name, batch, milliseconds))
        print_speed(speed)
    targets = check_targets(accuracy, speed, args.estimators if accuracy else [])
    if targets:
        print("\nTargets")
        for target in targets:
            print(f"  [{'met' if target['met'] else 'MISSED'}] {target['target']}: {target['value']}")
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "json"}
        write_json(
            args.json,
            {"config": config, "accuracy": [asdict(r) for r in accuracy], "speed": [asdict(r) for r in speed], "targets": targets},
        )
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
