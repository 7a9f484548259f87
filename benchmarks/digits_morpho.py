"""Digits-Morpho shortcut benchmark: MIMM-X against ERM, MIMM, the baselines and the oracle.

Example
-------
    python benchmarks/digits_morpho.py --method mimmx --correlation 0.9 \
        --confounders thickness,rotation --seeds 3 --json out.json
    python benchmarks/digits_morpho.py --method all --seeds 1     # every method, one seed
    python benchmarks/digits_morpho.py --method erm,mimmx,oracle --readout   # + what linear read-outs reach

Prints a table of inverted/balanced/iid accuracy, leakage and switched heads (means over seeds,
± sd) and writes JSON: ``{"method", "correlation", "seeds", "tests": {set: {"y_acc", "y_bacc",
"worst_group_acc"}}, "leakage": {factor: bacc}, "switched": {factor: acc}, "seconds", "per_seed"}``
(a list of these with ``--method`` naming several methods). ``--readout`` adds ``"readout"``: the
accuracy of linear read-outs refitted on the frozen features (:func:`readout_ceilings`).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from mimm_med.cli import at_least, output_file, shortcut_correlation, torch_device
from mimm_med.data.confounding import cell_balancing_weights
from mimm_med.data.digits_morpho import FACTORS, PRIMARY, digits_augmentation, make_digits_morpho
from mimm_med.data.manifest import SUBJECT
from mimm_med.data.writers import write_json
from mimm_med.engines import METHODS
from mimm_med.evaluation import conditional_mean_eraser, flatten_metrics, linear_readout_accuracy
from mimm_med.experiment import TEST_SETS, ExperimentConfig, run_experiment
from mimm_med.mi import ESTIMATORS

ALL_METHODS = ("erm", "rebalance", "adversarial", "dcor", "mmd", "mimm", "mimmx", "oracle")


def summarize_seed(metrics: dict[str, float], confounders: list[str], seconds: float) -> dict:
    """The benchmark's figures of one seed from flattened evaluation metrics."""
    return {
        "tests": {
            name: {key: metrics[f"{name}/{key}"] for key in ("y_acc", "y_bacc", "worst_group_acc")} for name in TEST_SETS
        },
        # On the balanced set z is independent of y: a probe or a switched head can only score by leakage.
        "leakage": {z: metrics[f"leakage/{z}"] for z in confounders},
        "switched": {z: metrics.get(f"balanced/{z}/switched_heads", float("nan")) for z in confounders},
        "seconds": seconds,
    }


def mean_over_seeds(per_seed: list[dict]) -> dict:
    """Mean of every leaf of the per-seed summaries (same nesting)."""
    first = per_seed[0]
    if isinstance(first, dict):
        return {key: mean_over_seeds([entry[key] for entry in per_seed]) for key in first}
    return float(np.mean(per_seed))


def sd_over_seeds(per_seed: list[dict], path: tuple[str, ...]) -> float:
    values = []
    for entry in per_seed:
        for key in path:
            entry = entry[key]
        values.append(entry)
    return float(np.std(values))


def frozen_features(network: torch.nn.Module, records: list[dict]) -> dict[str, np.ndarray]:
    """Backbone features, f_y and the primary head's predictions of ``records``."""
    network.eval()
    device = next(network.parameters()).device
    with torch.no_grad():
        images = torch.as_tensor(np.stack([r["image"] for r in records]), device=device)
        backbone = network.backbone(images)
        f_y = network.shared_layer(backbone)[:, : network.part_sizes[0]]
        predicted = network.heads[PRIMARY](f_y).argmax(dim=1)
    return {"backbone": backbone.cpu().numpy(), "f_y": f_y.cpu().numpy(), "predicted": predicted.cpu().numpy()}


def readout_ceilings(
    network: torch.nn.Module, sets: dict[str, list[dict]], confounders: list[str], seed: int
) -> dict[str, dict[str, float]]:
    """Accuracy of the y head and of linear read-outs refitted on the frozen features, per test set.

    The test subjects are halved: ``balanced-fit`` read-outs are fitted on the balanced versions of
    one half, data no method sees (what the features hold; deep feature reweighting). ``erased``
    read-outs are fitted on the training set after :func:`conditional_mean_eraser` and with
    cell-balancing weights (what a y head on a linearly invariant f_y could learn from the training
    set). Everything is scored on the iid, balanced and inverted versions of the other half; an
    invariant read-out scores alike on all three.
    """
    subjects = sorted({r[SUBJECT] for r in sets["test-balanced"]})
    fit_half = set(np.random.default_rng(seed).permutation(subjects)[: len(subjects) // 2])
    fit_records = [r for r in sets["test-balanced"] if r[SUBJECT] in fit_half]
    scored_records = {name: [r for r in sets[split] if r[SUBJECT] not in fit_half] for name, split in TEST_SETS.items()}
    train, fit = frozen_features(network, sets["train"]), frozen_features(network, fit_records)
    scored = {name: frozen_features(network, records) for name, records in scored_records.items()}
    y_train, y_fit = (np.array([r[PRIMARY] for r in records]) for records in (sets["train"], fit_records))
    y_scored = {name: np.array([r[PRIMARY] for r in records]) for name, records in scored_records.items()}
    factors = {z: np.array([r[z] for r in sets["train"]]) for z in confounders}
    weights = cell_balancing_weights({PRIMARY: y_train, **factors})
    ceilings = {"head": {name: float(np.mean(scored[name]["predicted"] == y_scored[name])) for name in scored}}
    for layer in ("f_y", "backbone"):
        eraser = conditional_mean_eraser(train[layer], y_train, factors)
        erased = {name: (scored[name][layer] @ eraser, y_scored[name]) for name in scored}
        ceilings[f"erased {layer}"] = linear_readout_accuracy(train[layer] @ eraser, y_train, erased, weights)
        plain = {name: (scored[name][layer], y_scored[name]) for name in scored}
        ceilings[f"balanced-fit {layer}"] = linear_readout_accuracy(fit[layer], y_fit, plain)
    return ceilings


def run_method(method: str, args: argparse.Namespace, confounders: list[str]) -> dict:
    per_seed = []
    for seed in range(args.seeds):
        sets = make_digits_morpho(
            args.correlation, confounders, seed=seed, train_correlation=0.5 if method == "oracle" else None
        )
        config = ExperimentConfig(
            method=method,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            mi_weight=args.mi_weight,
            n_critic=args.n_critic,
            critic_lr=args.critic_lr,
            estimator=args.estimator,
            conditional=args.conditional,
            balanced=args.balanced,
            reference=args.reference,
            part_size=args.part_size,
            invariant_head=args.invariant_head,
            seed=seed,
            device=args.device,
        )
        augmentation = digits_augmentation() if args.augment else None
        run = run_experiment(
            sets, PRIMARY, confounders, {name: 2 for name in (PRIMARY, *confounders)}, config, transform=augmentation
        )
        summary = summarize_seed(flatten_metrics(run["results"]), confounders, run["seconds"])
        if args.readout:
            summary["readout"] = readout_ceilings(run["network"], sets, confounders, seed)
        per_seed.append(summary)
        print(
            f"  {method} seed {seed}: inverted {summary['tests']['inverted']['y_acc']:.3f}, "
            f"balanced {summary['tests']['balanced']['y_acc']:.3f}, {run['seconds']:.0f} s",
            file=sys.stderr,
        )
    return {
        "method": method,
        "correlation": args.correlation,
        "seeds": args.seeds,
        "augment": args.augment,
        "part_size": args.part_size,
        **mean_over_seeds(per_seed),
        "per_seed": per_seed,
    }


def table(results: list[dict], confounders: list[str]) -> str:
    """Markdown table: one row per method, mean ± sd over seeds."""

    def cell(result: dict, *path: str) -> str:
        value = result
        for key in path:
            value = value[key]
        sd = sd_over_seeds(result["per_seed"], path)
        return f"{100 * value:.1f} ± {100 * sd:.1f}"

    header = ["method", "inverted acc", "inverted worst grp", "balanced acc", "iid acc"]
    header += [f"leakage {z}" for z in confounders] + [f"switched {z}" for z in confounders] + ["s / seed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        row = [
            r["method"],
            cell(r, "tests", "inverted", "y_acc"),
            cell(r, "tests", "inverted", "worst_group_acc"),
            cell(r, "tests", "balanced", "y_acc"),
            cell(r, "tests", "iid", "y_acc"),
        ]
        row += [cell(r, "leakage", z) for z in confounders] + [cell(r, "switched", z) for z in confounders]
        row.append(f"{r['seconds']:.0f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def readout_table(results: list[dict]) -> str:
    """Markdown table of :func:`readout_ceilings`: iid / balanced / inverted means, ± sd of inverted."""
    readouts = list(results[0]["readout"])
    lines = ["| method | " + " | ".join(readouts) + " |", "|" + "---|" * (len(readouts) + 1)]
    for r in results:
        cells = []
        for readout in readouts:
            means = " / ".join(f"{100 * r['readout'][readout][name]:.1f}" for name in TEST_SETS)
            cells.append(f"{means} ± {100 * sd_over_seeds(r['per_seed'], ('readout', readout, 'inverted')):.1f}")
        lines.append("| " + " | ".join([r["method"], *cells]) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="mimmx", help=f"comma-separated, or 'all' ({', '.join(ALL_METHODS)}); any of {', '.join(METHODS)} or oracle")
    parser.add_argument("--correlation", type=shortcut_correlation, default=0.9, help="r: P(confounder agrees with y) in training")
    parser.add_argument("--confounders", default=",".join(FACTORS), help=f"comma-separated subset of {','.join(FACTORS)}")
    parser.add_argument("--seeds", type=at_least(1), default=3, help="seeds 0 … N-1")
    parser.add_argument("--epochs", type=at_least(1), default=30)
    parser.add_argument("--batch-size", type=at_least(2), default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mi-weight", type=float, default=1.0, help="λ of the dependence term")
    parser.add_argument("--n-critic", type=at_least(1), default=3)
    parser.add_argument("--critic-lr", type=float, default=1e-3)
    parser.add_argument("--estimator", default="mine", choices=tuple(ESTIMATORS))
    parser.add_argument("--conditional", action=argparse.BooleanOptionalAction, default=False, help="estimate I(f_y; f_z | y)")
    parser.add_argument(
        "--balanced", action=argparse.BooleanOptionalAction, default=False, help="MI under cell-balanced weights"
    )
    parser.add_argument("--part-size", type=at_least(1), default=16, help="width of each feature part (f_y and every f_zk)")
    parser.add_argument("--reference", default="features", choices=("features", "labels"), help="what stands for z_k in I(f_y; z_k)")
    parser.add_argument(
        "--readout", action="store_true", help="also score linear read-outs refitted on the frozen features (readout_ceilings)"
    )
    parser.add_argument(
        "--invariant-head", action="store_true", help="refit the y head on f_y with the factors' linear traces erased"
    )
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="shift, scale and tilt the training digits (digits_augmentation)",
    )
    parser.add_argument("--device", type=torch_device, default="cpu")
    parser.add_argument("--threads", type=at_least(0), default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", type=output_file, help="write the results here (NaN as null)")
    args = parser.parse_args(argv)
    args.methods = list(ALL_METHODS) if args.method == "all" else args.method.split(",")
    unknown = [m for m in args.methods if m not in (*METHODS, "oracle")]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)} or oracle")
    args.confounders = args.confounders.split(",")
    if not set(args.confounders) <= set(FACTORS) or len(set(args.confounders)) != len(args.confounders):
        parser.error(f"--confounders takes distinct names from {','.join(FACTORS)}, got {','.join(args.confounders)!r}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    confounders = args.confounders
    start = time.perf_counter()
    results = [run_method(method, args, confounders) for method in args.methods]
    print(f"\nDigits-Morpho, r = {args.correlation}, confounders {confounders}, {args.seeds} seed(s), % (mean ± sd)\n")
    print(table(results, confounders))
    if args.readout:
        print(
            "\nAccuracy of y on half the test subjects, iid / balanced / inverted (± sd of inverted), %: "
            "the head and linear read-outs of the frozen features\n"
        )
        print(readout_table(results))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        write_json(args.json, results[0] if len(results) == 1 else results)
    return results


if __name__ == "__main__":
    main()
