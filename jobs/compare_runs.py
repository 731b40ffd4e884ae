"""Compare MLflow runs side by side: differing params, final metrics, retrieval recalls, throughput.

    python jobs/compare_runs.py --experiment demo                       # newest runs of an experiment
    python jobs/compare_runs.py --experiment demo --parent <run_id>     # the stages of one recipe run
    python jobs/compare_runs.py --runs <id> <id> --metrics '*t2v_r1' loss --plot compare.png

The tracking store is `--tracking-uri`, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.compare import DEFAULT_METRICS, comparison_rows, format_table, plot_runs, select_runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    parser.add_argument("--experiment", help="experiment name (runs are taken newest first, see --max-runs)")
    parser.add_argument("--parent", help="only the child runs of this parent run (a recipe execution)")
    parser.add_argument("--runs", nargs="+", default=[], metavar="ID", help="explicit run ids, in column order")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), metavar="PATTERN",
                        help="metric names or shell patterns to show (default: loss, R@1/5/10, clips/s)")
    parser.add_argument("--max-runs", type=int, default=20)
    parser.add_argument("--max-params", type=int, default=30, help="show at most this many differing params")
    parser.add_argument("--plot", metavar="FILE.png", help="also write loss curves and retrieval bars to a PNG")
    args = parser.parse_args(argv)

    runs = select_runs(args.tracking_uri, args.experiment, args.runs, args.parent, args.max_runs)
    if not runs:
        print(f"no runs found in {args.tracking_uri} for experiment {args.experiment!r}", file=sys.stderr)
        return 1
    print(format_table(*comparison_rows(runs, args.metrics, args.max_params)))
    if args.plot:
        print(f"plot written to {plot_runs(runs, args.tracking_uri, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
