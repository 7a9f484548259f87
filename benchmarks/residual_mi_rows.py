"""How many rows per cross-fitting fold the evaluation's residual MI needs: the measurement behind its minimum.

Cross-fitted MINE (``mimm_med.evaluation.residual_mutual_information`` at its defaults, 5 folds) on
correlated Gaussians with known MI, for a range of rows per fold, over several seeds; the table
gives the smallest, largest and mean estimate of each. ``MIN_ROWS_PER_FOLD`` is lowered for the run,
since the function refuses sets below it. Each line takes 10-60 s on one CPU thread.

    python benchmarks/residual_mi_rows.py --dims 4,16 --rows-per-fold 4,8,12,16,24,32,48 --seeds 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mimm_med.evaluation import leakage
from mimm_med.mi import correlated_gaussians

FOLDS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="4,16", help="feature dimensions of each side, comma-separated")
    parser.add_argument("--rows-per-fold", default="4,8,12,16,24,32,48", help="comma-separated")
    parser.add_argument("--true-mi", default="0,1", help="true MI in nats, comma-separated")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    leakage.MIN_ROWS_PER_FOLD = 2  # measure below the minimum the evaluation enforces
    print("dims  true MI  rows/fold     min      max     mean   seconds")
    for dim in (int(d) for d in args.dims.split(",")):
        for true_mi in (float(m) for m in args.true_mi.split(",")):
            for rows in (int(r) for r in args.rows_per_fold.split(",")):
                start = time.perf_counter()
                estimates = []
                for seed in range(args.seeds):
                    a, b = correlated_gaussians(FOLDS * rows, dim, true_mi, torch.Generator().manual_seed(100 + seed))
                    estimates.append(leakage.residual_mutual_information(a.numpy(), b.numpy(), "mine", folds=FOLDS, seed=seed))
                values = np.array(estimates)
                print(
                    f"{dim:4d}  {true_mi:7.1f}  {rows:9d}  {values.min():8.3f} {values.max():8.3f} {values.mean():8.3f}"
                    f"  {time.perf_counter() - start:7.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
