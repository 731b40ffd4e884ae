"""Run a multi-stage recipe: training stages, then retrieval evaluations, under one MLflow parent run.

    python jobs/run_recipe.py configs/recipes/demo_cpu.yaml out_dir=/abs/demo_out data_root=/abs/demo_out/data
    python jobs/run_recipe.py configs/recipes/m_5m_vtc.yaml --dry-run          # validate and print the plan
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/run_recipe.py <recipe> out_dir=s3://...

Overrides: out_dir=, data_root=, experiment=, settings.<key>= (every stage), stages.<name>.<key>=,
evals.<name>.<key>=. Rerunning the same command skips finished steps and resumes the interrupted one.
Under Ray Jobs the command runs in a copy of the working dir: give out_dir and data_root as absolute paths.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import exit_status
from pipeline.compare import format_table
from pipeline.recipe import RecipeResult, load_recipe, recorded_result, run_recipe, summary_tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe YAML (configs/recipes/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides (see above)")
    parser.add_argument("--dry-run", action="store_true", help="validate every step's config, print the plan, stop")
    parser.add_argument("--summary", action="store_true", help="print what an earlier run of this out_dir recorded")
    args = parser.parse_args(argv)
    return exit_status(lambda: run(args))


def run(args: argparse.Namespace) -> None:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.summary:
        print_summary(recorded_result(recipe))
        return
    result = run_recipe(recipe, dry_run=args.dry_run)
    if not args.dry_run:
        print_summary(result)


def print_summary(result: RecipeResult) -> None:
    step_header, step_rows, ret_header, ret_rows = summary_tables(result)
    print(f"\nrecipe parent run {result.parent_run_id}, experiment {result.experiment!r}")
    print(f"tracking store: {result.tracking_uri}")
    print(format_table(step_header, step_rows))
    if ret_rows:
        print("\nzero-shot retrieval on the held-out split (%), chance level beside it")
        print(format_table(ret_header, ret_rows))


if __name__ == "__main__":
    sys.exit(main())
