"""Multi-stage recipes: training stages and retrieval evaluations chained under one MLflow parent run.

A recipe YAML names its steps in order; each step starts from an earlier step's export:

    name: demo_cpu
    out_dir: demo_out                      # everything the recipe writes goes under here
    data_root: demo_out/data               # substituted for ${data_root} in settings and overrides
    settings:                              # overrides applied to every training stage
      scaling: {num_workers: 1}
      data: {train_shards: "${data_root}/train"}
    stages:
      - {name: mask, config: ../stages/masked_alignment_test.yaml}
      - {name: distill, config: ../stages/self_distill_test.yaml, from: mask}
      - {name: vtc, config: ../stages/video_text_test.yaml, from: distill, overrides: {optim: {max_steps: 50}}}
    evals:
      - {name: synthetic, config: ../eval/synthetic.yaml, from: vtc}
    results_file: ${out_dir}/retrieval.json   # the default: every evaluation's final numbers, one file

`from:` is an earlier step's name (its `<out_dir>/<name>/export/model.pt`) or a file path; the runner
writes it into the key the stage's task reads its initial weights from (its `TaskSpec.init_key`, or `init_key:`).
`${export:<stage>}` in any override value names a stage's export, for a second set of weights.

Rerunning the same recipe with the same `out_dir` continues it: the parent run id and every finished
step are kept in `<out_dir>/recipe_state.json`; a finished step (recorded there, its MLflow run
FINISHED, its export present) is skipped, and an interrupted stage is restarted with the same run name
and checkpoint path, so the engine resumes it from its last checkpoint into the same MLflow run.

When the recipe has evaluations, the runner ends by writing `results_file` (default
`<out_dir>/retrieval.json`): `{<eval name>: {t2v_r1, ..., v2t_meanr, num_videos, num_texts, chance_r1,
chance_r5, chance_r10, run_id, checkpoint}}`, recalls and chance levels in percent.

The package: `spec` (the file, its steps and variables), `resolve` (each step's config), `state` (the record
that makes a rerun continue), `runner` (running the steps under the parent run), `report` (plan, results file,
summary tables).
"""

from pipeline.recipe.report import chance_recall, plan_lines, retrieval_results, summary_tables, write_retrieval_results
from pipeline.recipe.resolve import default_tracking, fingerprint, init_key_of, resolve_step_config, step_overrides
from pipeline.recipe.runner import run_recipe
from pipeline.recipe.spec import Recipe, RecipeError, StepSpec, load_recipe, recipe_yaml
from pipeline.recipe.state import STATE_FILE, RecipeResult, RecipeState, recorded_result

__all__ = [
    "STATE_FILE",
    "Recipe",
    "RecipeError",
    "RecipeResult",
    "RecipeState",
    "StepSpec",
    "chance_recall",
    "default_tracking",
    "fingerprint",
    "init_key_of",
    "load_recipe",
    "plan_lines",
    "recipe_yaml",
    "recorded_result",
    "resolve_step_config",
    "retrieval_results",
    "run_recipe",
    "step_overrides",
    "summary_tables",
    "write_retrieval_results",
]
