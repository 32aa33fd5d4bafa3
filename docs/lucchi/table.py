"""The Lucchi++ table from the run folders of docs/lucchi/run.sh: the final validation row of
each variant's train_log.csv, and its steps and training time.

    python docs/lucchi/table.py runs/lucchi
"""

import csv
import sys
from pathlib import Path

VARIANTS = [("baseline", "Baseline (no SST, no FG-BG)"), ("sst", "+ SST"), ("sst-fgbg", "+ SST + FG-BG")]


def summary(run: Path) -> dict[str, str]:
    rows = list(csv.DictReader((run / "train_log.csv").open()))
    steps = [r for r in rows if r.get("seconds")]
    scored = [r for r in rows if r.get("val_jaccard")]
    jaccard, dsc = (f"{float(scored[-1][k]):.3f}" for k in ("val_jaccard", "val_dsc")) if scored else ("not yet", "")
    return {
        "steps": steps[-1]["step"] if steps else "0",
        "minutes": f"{float(steps[-1]['seconds']) / 60:.1f}" if steps else "0",
        "jaccard": jaccard,
        "dsc": dsc,
    }


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/lucchi")
    print("| variant | steps | training min | Jaccard | DSC |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, label in VARIANTS:
        if (root / name / "train_log.csv").exists():
            s = summary(root / name)
            print(f"| {label} | {s['steps']} | {s['minutes']} | {s['jaccard']} | {s['dsc']} |")
        else:
            print(f"| {label} | not run | | | |")


if __name__ == "__main__":
    main()
