"""compare_runs against a real temporary MLflow sqlite store holding a few logged runs."""

from __future__ import annotations

import pytest

from jobs.compare_runs import main as compare_main
from pipeline.compare import comparison_rows, differing_params, format_table, select_runs


@pytest.fixture()
def store(tmp_path):
    """Three runs in one experiment: two stages with loss curves, one evaluation with recalls."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("cmp", artifact_location=(tmp_path / "artifacts").as_uri())
    ids = {}
    for name, lr, losses in [("mask", "0.001", [1.0, 0.7, 0.4]), ("vtc", "0.0004", [2.0, 1.5, 1.25])]:
        run = client.create_run(exp_id, run_name=name)
        client.log_param(run.info.run_id, "optim.lr", lr)
        client.log_param(run.info.run_id, "model.name", "videomamba_test")
        for step, loss in enumerate(losses):
            client.log_metric(run.info.run_id, "train/loss", loss, step=step)
        client.log_metric(run.info.run_id, "train/clips_per_s", 12.5)
        client.set_terminated(run.info.run_id)
        ids[name] = run.info.run_id
    run = client.create_run(exp_id, run_name="eval")
    # The names pipeline.evaluation logs on its run (the recipe's parent run gets them as `<eval>/t2v_r1`).
    for key, value in {"t2v_r1": 40.0, "t2v_r5": 80.0, "t2v_r10": 95.0, "v2t_r1": 37.5, "timing/total_s": 3.0}.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    ids["eval"] = run.info.run_id
    return uri, ids


def test_table_shows_differing_params_final_metrics_and_recalls(store):
    uri, ids = store
    runs = select_runs(uri, experiment="cmp")
    assert [r.name for r in runs] == ["mask", "vtc", "eval"]  # oldest first
    assert differing_params(runs) == ["model.name", "optim.lr"]  # eval run has no model.name param
    header, rows = comparison_rows(runs)
    table = {row[0]: row[1:] for row in rows}
    assert header == ["field", "mask", "vtc", "eval"]
    assert table["param optim.lr"] == ["0.001", "0.0004", "-"]
    assert table["train/loss"] == ["0.4", "1.25", "-"]  # the final value, not the first or the mean
    assert table["train/clips_per_s"] == ["12.5", "12.5", "-"]
    assert table["t2v_r1"] == ["-", "-", "40"]
    assert table["t2v_r10"] == ["-", "-", "95"]
    assert "timing/total_s" not in table  # not a default column
    text = format_table(header, rows)
    assert text.splitlines()[0].split() == header


def test_cli_by_run_ids_writes_png(store, tmp_path, capsys):
    uri, ids = store
    png = tmp_path / "plots" / "cmp.png"
    code = compare_main(["--tracking-uri", uri, "--runs", ids["eval"], ids["mask"], "--plot", str(png)])
    assert code == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["field", "eval", "mask"]  # the order given on the command line
    assert "t2v_r1" in out and "train/loss" in out
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.shape[0] > 200 and image.shape[1] > 600


def test_unknown_experiment_and_run_are_named(store):
    uri, _ = store
    with pytest.raises(ValueError, match="no experiment 'nope'.*existing: .*cmp"):
        select_runs(uri, experiment="nope")
    with pytest.raises(ValueError, match="no run 'deadbeef'"):
        select_runs(uri, run_ids=["deadbeef"])
