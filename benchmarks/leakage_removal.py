"""Can a dependence term remove a linear leak when nothing competes with it?

A diagnostic for the MI penalty, separated from everything else training does. A MIMM-X network
(λ = 0, so its backbone encodes the digit, thickness and rotation) is trained on Digits-Morpho;
then the backbone is frozen and only the linear map from backbone features to f_y is optimized,
on the dependence term alone (no task loss unless ``--task-weight``, which also trains a y head on
f_y and reports its accuracy). A linear map that removes
every linear trace of the factors exists (project out the class-mean differences), so a working
penalty must drive the leakage probe towards 50 %. The table gives the probe's balanced accuracy
on the balanced test set after each block of steps.

    python benchmarks/leakage_removal.py --estimators mine,club,gaussian --json leakage_removal.json
    python benchmarks/leakage_removal.py --estimators gaussian --batch-size 1078   # full-batch estimate
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mimm_med.cli import at_least, output_file, shortcut_correlation
from mimm_med.data.confounding import cell_balancing_weights
from mimm_med.data.digits_morpho import FACTORS, PRIMARY, make_digits_morpho
from mimm_med.data.writers import write_json
from mimm_med.engines.dependence import MutualInformationTerms
from mimm_med.evaluation.leakage import linear_probe_leakage
from mimm_med.experiment import ExperimentConfig, run_experiment
from mimm_med.mi import ESTIMATORS
from mimm_med.networks import MIMMXNet


def frozen_backbone_features(args: argparse.Namespace) -> tuple[MIMMXNet, dict[str, tuple[Tensor, dict[str, Tensor]]]]:
    """Train the λ = 0 network; return it and the frozen backbone features of train and balanced test."""
    sets = make_digits_morpho(args.correlation, FACTORS, seed=args.seed)
    config = ExperimentConfig(method="mimmx", mi_weight=0.0, epochs=args.pretrain_epochs, seed=args.seed)
    network = run_experiment(sets, PRIMARY, list(FACTORS), {name: 2 for name in (PRIMARY, *FACTORS)}, config)["network"]
    network.eval()
    features = {}
    for split in ("train", "test-balanced", "test-inverted"):
        records = sets[split]
        with torch.no_grad():
            backbone = network.backbone(torch.as_tensor(np.stack([r["image"] for r in records])))
        labels = {name: torch.as_tensor([r[name] for r in records]) for name in (PRIMARY, *FACTORS)}
        features[split] = (backbone, labels)
    return network, features


def probe(
    projection: torch.nn.Linear, head: torch.nn.Linear, features: dict[str, tuple[Tensor, dict[str, Tensor]]], part: int
) -> dict[str, float]:
    """Leakage of each factor from f_y on the balanced test set, and the y head's accuracy on the balanced and inverted sets."""
    with torch.no_grad():
        f_y = {split: projection(features[split][0])[:, :part] for split in ("test-balanced", "test-inverted")}
        accuracy = {
            f"y {split[5:]}": float((head(f_y[split]).argmax(dim=1) == features[split][1][PRIMARY]).float().mean())
            for split in f_y
        }
    balanced_labels = features["test-balanced"][1]
    return {**{z: linear_probe_leakage(f_y["test-balanced"].numpy(), balanced_labels[z].numpy()) for z in FACTORS}, **accuracy}


def remove_leak(
    estimator: str, network: MIMMXNet, features: dict[str, tuple[Tensor, dict[str, Tensor]]], args: argparse.Namespace
) -> dict:
    """Optimize the f_y rows of the shared layer on the dependence term; probe every ``--report-every`` steps."""
    torch.manual_seed(args.seed)
    part = network.part_sizes[0]
    projection = torch.nn.Linear(network.shared_layer.in_features, network.shared_layer.out_features)
    projection.load_state_dict(network.shared_layer.state_dict())
    head = torch.nn.Linear(part, 2)
    terms = MutualInformationTerms(
        PRIMARY,
        list(FACTORS),
        dict(zip(network.part_names, network.part_sizes)),
        estimator,
        conditional=args.conditional,
        balanced=args.balanced,
        reference=args.reference,
        num_classes=network.num_classes,
    )
    optimizer = torch.optim.Adam([*projection.parameters(), *head.parameters()], lr=args.lr)
    critic_parameters = list(terms.parameters())
    critic_optimizer = torch.optim.Adam(critic_parameters, lr=args.critic_lr) if critic_parameters else None
    train_features, train_labels = features["train"]
    generator = torch.Generator().manual_seed(args.seed)
    cell_weights = torch.as_tensor(cell_balancing_weights({name: values.numpy() for name, values in train_labels.items()}))
    curve = [{"step": 0, **probe(projection, head, features, part)}]
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        if args.cell_balanced:  # every (y, z_1, z_2) cell equally often
            rows = torch.multinomial(cell_weights, args.batch_size, replacement=True, generator=generator)
        else:
            rows = torch.randint(0, len(train_features), (args.batch_size,), generator=generator)
        labels = {name: values[rows] for name, values in train_labels.items()}
        parts = projection(train_features[rows]).split(network.part_sizes, dim=1)
        # Only f_y is optimized; the factor parts stay the fixed reference of what each factor looks like.
        outputs = {f"{name}_features": p if name == PRIMARY else p.detach() for name, p in zip(network.part_names, parts)}
        for _ in range(args.n_critic if critic_optimizer else 0):
            critic_optimizer.zero_grad()
            terms.critic_loss({k: v.detach() for k, v in outputs.items()}, labels).backward()
            critic_optimizer.step()
        dependence = torch.stack(list(terms(outputs, labels).values())).mean()
        loss = dependence + args.task_weight * F.cross_entropy(head(outputs[f"{PRIMARY}_features"]), labels[PRIMARY])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.report_every == 0:
            curve.append({"step": step, "dependence": float(dependence.detach()), **probe(projection, head, features, part)})
    return {"estimator": estimator, "curve": curve, "seconds": time.perf_counter() - start}


def table(results: list[dict], keys: tuple[str, ...]) -> str:
    steps = [point["step"] for point in results[0]["curve"]]
    header = ["estimator", *(f"step {s}" for s in steps), "s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        cells = [" / ".join(f"{100 * point[key]:.1f}" for key in keys) for point in result["curve"]]
        lines.append("| " + " | ".join([result["estimator"], *cells, f"{result['seconds']:.0f}"]) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--estimators", default="mine,club,gaussian", help=f"comma-separated, of {', '.join(ESTIMATORS)}")
    parser.add_argument("--correlation", type=shortcut_correlation, default=0.9)
    parser.add_argument("--pretrain-epochs", type=at_least(1), default=10)
    parser.add_argument("--steps", type=at_least(1), default=3000)
    parser.add_argument("--report-every", type=at_least(1), default=1000)
    parser.add_argument("--batch-size", type=at_least(2), default=64)
    parser.add_argument("--cell-balanced", action="store_true", help="draw batches with every (y, z) cell equally often")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--critic-lr", type=float, default=1e-3)
    parser.add_argument("--n-critic", type=at_least(1), default=3)
    parser.add_argument("--task-weight", type=float, default=0.0, help="weight of the primary loss beside the dependence term")
    parser.add_argument("--reference", default="labels", choices=("features", "labels"))
    parser.add_argument("--conditional", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=at_least(1), default=1, help="torch CPU threads")
    parser.add_argument("--json", type=output_file, help="write the curves here (NaN as null)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    estimators = args.estimators.split(",")
    unknown = [name for name in estimators if name not in ESTIMATORS]
    if unknown:
        raise SystemExit(f"unknown estimators {unknown}; choose from {list(ESTIMATORS)}")
    network, features = frozen_backbone_features(args)
    results = [remove_leak(name, network, features, args) for name in estimators]
    print(f"\nLeakage of {' / '.join(FACTORS)} from f_y on the balanced test set, % (50 = none), batch {args.batch_size}\n")
    print(table(results, FACTORS))
    if args.task_weight:
        print("\nAccuracy of the y head on the balanced / inverted test sets, %\n")
        print(table(results, ("y balanced", "y inverted")))
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
