"""Recipe parsing, validation, config resolution and the skip-completed-stage logic."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from pipeline.recipe import (
    STATE_FILE,
    RecipeError,
    default_tracking,
    load_recipe,
    resolve_step_config,
    run_recipe,
    write_retrieval_results,
)

TOY_STAGE = """\
stage: toy
task: {name: toy, in_dim: 8, hidden_dim: 16, out_dim: 2}
data: {batch_size: 8}
optim: {lr: 0.01, max_steps: 6}
scaling: {use_ray: false}
checkpoint: {interval_steps: 3}
tracking: {log_interval: 2}
"""


def write_recipe(tmp_path: Path, body: str) -> Path:
    (tmp_path / "stages").mkdir(exist_ok=True)
    (tmp_path / "stages" / "toy.yaml").write_text(TOY_STAGE)
    path = tmp_path / "recipes" / "r.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(body))
    return path


TWO_STAGES = """\
name: two
out_dir: out
settings:
  optim: {lr: 2.0e-2, min_lr: 8.0e-5}
  data.batch_size: 4
stages:
  - {name: first, config: ../stages/toy.yaml}
  - name: second
    config: ../stages/toy.yaml
    from: first
    overrides: {optim.lr: 0.005, seed: 3}
"""


def test_settings_overrides_and_from_become_config_keys(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, TWO_STAGES), ["out_dir=" + str(tmp_path / "o")])
    uri, experiment = default_tracking(recipe)
    assert experiment == "two" and uri == f"sqlite:///{tmp_path / 'o' / 'mlflow.db'}"
    first, second = (resolve_step_config(recipe, s, uri, experiment, "PARENT") for s in recipe.stages)
    assert first.optim.lr == 0.02 and second.optim.lr == 0.005  # the stage's own override wins over settings
    assert first.data.batch_size == second.data.batch_size == 4
    assert first.optim.min_lr == 8e-5  # a float written as 8e-05 would come back as a string
    assert first.model.pretrained is None
    assert second.model.pretrained == str(tmp_path / "o" / "first" / "export" / "model.pt")
    assert second.output_dir == str(tmp_path / "o" / "second")
    assert second.checkpoint.path == str(tmp_path / "o" / "checkpoints")
    tracking = second.tracking
    assert (tracking.parent_run_id, tracking.run_name, tracking.uri) == ("PARENT", "two.second", uri)
    assert second.seed == 3 and second.stage == "second"


def test_command_line_overrides_reach_settings_and_one_stage(tmp_path):
    recipe = load_recipe(
        write_recipe(tmp_path, TWO_STAGES),
        ["settings.optim.max_steps=2", "stages.second.optim.max_steps=5", "stages.second.from=/w/init.pt"],
    )
    cfgs = [resolve_step_config(recipe, s, "sqlite:///x.db", "e") for s in recipe.stages]
    assert [c.optim.max_steps for c in cfgs] == [2, 5]
    assert cfgs[1].model.pretrained == "/w/init.pt"


@pytest.mark.parametrize(
    "body, message",
    [
        ("stages:\n  - {name: a, config: ../stages/toy.yaml, overides: {}}\n", r"unknown key\(s\) \['overides'\]"),
        ("stages:\n  - {name: a, config: ../stages/toy.yaml, from: b}\n  - {name: b, config: ../stages/toy.yaml}\n",
         "stage 'b', which runs later"),
        ("stages:\n  - {name: a, config: ../stages/toy.yaml, from: nosuch}\n", "'nosuch', which is not a stage"),
        ("stages:\n  - {name: a, config: ../stages/toy.yaml}\n  - {name: a, config: ../stages/toy.yaml}\n",
         "'a' is used twice"),
        ("stage:\n  - {name: a, config: ../stages/toy.yaml}\n", r"unknown recipe keys \['stage'\]"),
        ("stages:\n  - {config: ../stages/toy.yaml}\n", "`name` is required"),
    ],
)
def test_invalid_recipes_name_the_problem(tmp_path, body, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(tmp_path, body))


def test_bad_overrides_and_bad_stage_keys_are_named(tmp_path):
    path = write_recipe(tmp_path, TWO_STAGES)
    with pytest.raises(RecipeError, match="no stage named 'third'"):
        load_recipe(path, ["stages.third.seed=1"])
    with pytest.raises(RecipeError, match="unknown recipe key 'optim.lr'"):
        load_recipe(path, ["optim.lr=1"])
    recipe = load_recipe(path, ["stages.first.optim.lrr=1"])
    with pytest.raises(RecipeError, match=r"stage 'first'.*optim.lrr: unknown key \(did you mean 'lr'\?\)"):
        resolve_step_config(recipe, recipe.stages[0], "sqlite:///x.db", "e")
    recipe = load_recipe(path, ["stages.first.output_dir=/elsewhere"])
    with pytest.raises(RecipeError, match="output_dir is set by the recipe runner"):
        resolve_step_config(recipe, recipe.stages[0], "sqlite:///x.db", "e")


def test_data_root_must_be_given_when_used(tmp_path):
    body = TWO_STAGES.replace("  data.batch_size: 4", "  data.train_shards: ${data_root}/train")
    recipe = load_recipe(write_recipe(tmp_path, body))
    with pytest.raises(RecipeError, match=r"uses \$\{data_root\} but the recipe has none; pass data_root="):
        resolve_step_config(recipe, recipe.stages[0], "sqlite:///x.db", "e")
    recipe = load_recipe(write_recipe(tmp_path, body), ["data_root=/d"])
    assert resolve_step_config(recipe, recipe.stages[0], "sqlite:///x.db", "e").data.train_shards == "/d/train"


def test_dry_run_prints_plan_and_trains_nothing(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, TWO_STAGES), ["out_dir=" + str(tmp_path / "o")])
    lines: list[str] = []
    result = run_recipe(recipe, dry_run=True, log=lines.append)
    text = "\n".join(lines)
    assert "1. stage first" in text and "2. stage second" in text and "model.pretrained <- first" in text
    assert "task=toy" in text and "steps=6" in text
    assert result.steps == {} and not (tmp_path / "o").exists()


@pytest.mark.timeout(240)
def test_rerun_skips_completed_stage_and_reuses_parent_run(tmp_path):
    """Run a two-stage toy recipe, forget the second stage, rerun: only the second stage runs again."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "o"
    recipe_path = write_recipe(tmp_path, TWO_STAGES)
    first = run_recipe(load_recipe(recipe_path, [f"out_dir={out}"]), log=lambda line: None)
    assert set(first.steps) == {"first", "second"} and first.skipped == []
    state = json.loads((out / STATE_FILE).read_text())
    client = MlflowClient(first.tracking_uri)
    children = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name("two").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{first.parent_run_id}'")}
    assert set(children) == {"two.first", "two.second"}
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert state["steps"]["first"]["run_id"] == children["two.first"].info.run_id

    # Forget that the second stage finished (as if the driver died before recording it).
    del state["steps"]["second"]
    (out / STATE_FILE).write_text(json.dumps(state))
    logs: list[str] = []
    second = run_recipe(load_recipe(recipe_path, [f"out_dir={out}"]), log=logs.append)
    assert second.parent_run_id == first.parent_run_id
    assert second.skipped == ["first"]
    assert any(line.startswith("[second] running") for line in logs)
    assert not any(line.startswith("[first] running") for line in logs)
    assert client.get_run(first.parent_run_id).info.status == "FINISHED"
    parents = client.search_runs([client.get_experiment_by_name("two").experiment_id],
                                 filter_string="tags.recipe = 'two'")
    assert len(parents) == 1

    # Changing a finished stage's config is refused instead of silently reusing the old export.
    with pytest.raises(RecipeError, match=r"\[first\] was completed with a different configuration"):
        run_recipe(load_recipe(recipe_path, [f"out_dir={out}", "stages.first.optim.lr=0.5"]), log=lambda line: None)


@pytest.mark.timeout(240)
def test_interrupted_stage_resumes_in_the_same_child_run(tmp_path):
    """Kill the recipe's process inside stage 2, rerun the same command: stage 1 is skipped, stage 2 continues
    from its last checkpoint in the same MLflow run, and no step is logged twice."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    out = tmp_path / "o"
    recipe_path = write_recipe(tmp_path, TWO_STAGES)
    overrides = [f"out_dir={out}", "stages.second.task.exit_at_batch=4", "stages.second.task.exit_rank=0",
                 f"stages.second.task.exit_marker={tmp_path / 'exited'}"]
    repo = Path(__file__).resolve().parents[2]
    crashed = subprocess.run([sys.executable, "jobs/run_recipe.py", str(recipe_path), *overrides], cwd=repo,
                             capture_output=True, text=True, timeout=200)
    assert crashed.returncode == 17, crashed.stdout[-2000:] + crashed.stderr[-2000:]  # the toy task's os._exit
    state = json.loads((out / STATE_FILE).read_text())
    assert list(state["steps"]) == ["first"]  # stage 2 never finished

    logs: list[str] = []
    result = run_recipe(load_recipe(recipe_path, overrides), log=logs.append)
    assert result.skipped == ["first"] and result.parent_run_id == state["parent_run_id"]
    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("two").experiment_id],
                              filter_string="attributes.run_name = 'two.second'")
    assert len(runs) == 1, "the resumed stage must continue its MLflow run, not open a second one"
    assert runs[0].info.run_id == result.steps["second"]["run_id"] and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert sorted(steps) == sorted(set(steps)) and max(steps) == 6, steps
    assert result.steps["second"]["resumed_from_step"] == 3  # the checkpoint before the crash (interval 3)
    assert any(line.startswith("[second] running") for line in logs)


EVAL_RECORD = {  # what the runner records for a finished evaluation (pipeline.recipe._run_eval)
    "status": "done", "kind": "eval", "run_id": "abc", "checkpoint": "/o/vtc/export/model.pt",
    "metrics": {"t2v_r1": 17.5, "t2v_r5": 70.0, "t2v_r10": 97.5, "t2v_medr": 3.0, "t2v_meanr": 4.2,
                "v2t_r1": 20.0, "v2t_r5": 75.0, "v2t_r10": 100.0, "v2t_medr": 3.0, "v2t_meanr": 3.9,
                "videos": 40.0, "texts": 40.0, "skipped_videos": 0.0, "timing/total_s": 4.0},
}


def test_results_file_holds_every_eval_with_chance_level(tmp_path):
    body = TWO_STAGES + "evals:\n  - {name: ev, config: ../stages/toy.yaml, from: second}\n"
    recipe = load_recipe(write_recipe(tmp_path, body), ["out_dir=" + str(tmp_path / "o")])
    assert recipe.results_path() == tmp_path / "o" / "retrieval.json"  # the default
    recipe = load_recipe(write_recipe(tmp_path, body),
                         ["out_dir=" + str(tmp_path / "o"), "results_file=${out_dir}/../final.json"])
    path = write_retrieval_results(recipe, {"first": {"status": "done", "metrics": {}}, "ev": EVAL_RECORD})
    assert path == tmp_path / "final.json"
    results = json.loads(path.read_text())
    assert list(results) == ["ev"]  # evaluations only
    entry = results["ev"]
    assert entry["num_videos"] == 40 and entry["num_texts"] == 40
    assert entry["chance_r1"] == pytest.approx(100 / 40) and entry["chance_r10"] == pytest.approx(25.0)
    assert {k: entry[k] for k in EVAL_RECORD["metrics"] if k[:4] in ("t2v_", "v2t_")} == {
        k: v for k, v in EVAL_RECORD["metrics"].items() if k[:4] in ("t2v_", "v2t_")}
    assert "timing/total_s" not in entry and "videos" not in entry
    assert entry["checkpoint"] == "/o/vtc/export/model.pt" and entry["run_id"] == "abc"


def test_the_parent_runs_recipe_artifact_masks_credentials(tmp_path):
    from pipeline.recipe import recipe_yaml

    (tmp_path / "r.yaml").write_text(
        "name: r\nsettings: {checkpoint: {storage_options: {key: AKIA, secret: hunter2}}}\n"
        "stages:\n  - {name: a, config: ../stages/toy.yaml}\n")
    text = recipe_yaml(load_recipe(tmp_path / "r.yaml"))
    assert "hunter2" not in text and "secret: '***'" in text
