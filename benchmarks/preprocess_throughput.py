"""Preprocessing throughput: the bare MONAI chain against ``mimm-med preprocess`` with 1 and N workers.

On a stand-in UK Biobank cohort of MNI-sized 1 mm T1 volumes, times

(a) the brain_t1 transform chain in a plain loop (read + transforms + ``nibabel.save``),
(b) ``mimm-med preprocess`` with 1 worker (the same chain plus pseudonyms, checks, atomic writes,
    manifest and error report),
(c) ``mimm-med preprocess --workers N``,

and prints volumes per second side by side. Targets: (b) at least 90 % of (a); (c) close to N × (b)
on N free cores. Each configuration runs ``--repeats`` times on fresh output folders, in rotating
order; the best run counts, as the machine may be shared.

    python benchmarks/preprocess_throughput.py --n 16 --workers 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
from monai.bundle import ConfigParser

from mimm_med.cli import main as mimm_med
from mimm_med.data.cohort_card import CohortCard
from mimm_med.data.preprocess import load_pipeline_config
from mimm_med.data.standins import generate_cohort

CARD = Path(__file__).parents[1] / "cohorts" / "ukb.yaml"
KEY = "benchmark-key-not-for-real-data"


def bare_chain(images: list[str], config: dict, out: Path) -> float:
    """Seconds for (a): build the chain, then read, transform and write every image."""
    start = time.perf_counter()
    transform = ConfigParser(config).get_parsed_content("preprocessing")
    out.mkdir(parents=True)
    for i, path in enumerate(images):
        image = transform({"image": path})["image"]
        nib.save(nib.Nifti1Image(image[0].numpy(), image.affine.numpy()), out / f"{i}.nii.gz")
    return time.perf_counter() - start


def command(raw: Path, out: Path, workers: int) -> float:
    """Seconds for ``mimm-med preprocess`` in this process (imports already paid, as for (a))."""
    start = time.perf_counter()
    status = mimm_med(
        ["preprocess", "--cohort", str(CARD), "--raw", str(raw), "--out", str(out),
         "--workers", str(workers), "--key", KEY, "--no-progress"]
    )
    seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"mimm-med preprocess exited with {status}; see {out / 'errors.csv'}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16, help="volumes (default: 16)")
    parser.add_argument("--workers", type=int, default=2, help="workers of run (c) (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration, best counts (default: 3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mimm-med-bench-") as work:
        work = Path(work)
        raw = generate_cohort("ukb", args.n, work / "raw", seed=args.seed, resolution_mm=1.0)
        card = CohortCard.from_yaml(CARD)
        records, _ = card.index(raw)
        images = list(records["image"])
        for path in images:  # every configuration reads from the page cache
            Path(path).read_bytes()
        config = load_pipeline_config(card.pipeline)
        shape = nib.load(images[0]).shape

        names = ("(a) bare MONAI chain", "(b) preprocess, 1 worker", f"(c) preprocess, {args.workers} workers")
        best = dict.fromkeys(names, float("inf"))
        for repeat in range(args.repeats):
            runs = {
                names[0]: lambda: bare_chain(images, config, work / f"a{repeat}"),
                names[1]: lambda: command(raw, work / f"b{repeat}", 1),
                names[2]: lambda: command(raw, work / f"c{repeat}", args.workers),
            }
            # Rotate the order so that drifting load on a shared machine favours no configuration.
            for name in names[repeat % 3 :] + names[: repeat % 3]:
                best[name] = min(best[name], runs[name]())

    print(f"\n{args.n} stand-in UK Biobank T1 volumes of {shape} voxels at 1 mm, best of {args.repeats}")
    print(f"{'':32s}{'volumes/s':>10s}{'s/volume':>10s}{'vs (a)':>8s}{'vs (b)':>8s}")
    a, b = best[names[0]], best[names[1]]
    for name, seconds in best.items():
        print(f"{name:32s}{args.n / seconds:10.2f}{seconds / args.n:10.3f}{a / seconds:8.2f}{b / seconds:8.2f}")


if __name__ == "__main__":
    main()
