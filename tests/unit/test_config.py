"""Config loading and validation: every bad key or value is named with what is allowed."""

from __future__ import annotations

import pytest

from pipeline.config import Config, ConfigError, flatten, from_dict, load_config, to_dict, to_yaml


def write(path, text: str):
    path.write_text(text)
    return path


def test_defaults_include_and_override_order(tmp_path):
    write(tmp_path / "base.yaml", "optim: {lr: 0.1, max_steps: 50}\ndata: {batch_size: 4}\n")
    (tmp_path / "stages").mkdir()
    stage = write(tmp_path / "stages" / "s.yaml", "defaults: [../base.yaml]\noptim: {lr: 0.2}\ntask: {name: toy}\n")
    cfg = load_config(stage, ["optim.warmup_steps=5", "data.batch_size=8", "task.hidden_dim=7"])
    # include < file < command line; untouched keys keep the include's value
    assert (cfg.optim.lr, cfg.optim.max_steps, cfg.optim.warmup_steps) == (0.2, 50, 5)
    assert cfg.data.batch_size == 8
    assert type(cfg.task).__name__ == "ToyTaskConfig" and cfg.task.hidden_dim == 7


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key \(did you mean 'lr'\?\)"):
        load_config(None, ["optim.lrr=0.1"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"data\.batch_size: expected an integer, got 'eight'"):
        load_config(None, ["data.batch_size=eight"])
    with pytest.raises(ConfigError, match=r"scaling\.use_ray: expected true or false, got 1"):
        load_config(None, ["scaling.use_ray=1"])


def test_exponent_without_dot_is_a_number():
    # YAML 1.1 parses `1e-3` as a string; float fields accept it, anything else non-numeric is still an error.
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3
    with pytest.raises(ConfigError, match=r"optim\.lr: expected a number, got 'fast'"):
        load_config(None, ["optim.lr=fast"])


def test_wrong_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"nonfinite: 'ignore' is not allowed; choose one of \['stop', 'skip'\]"):
        load_config(None, ["nonfinite=ignore"])
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage: 4 is not allowed"):
        load_config(None, ["deepspeed.zero_stage=4"])


def test_range_checks_name_the_field():
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps: must be in \[0, optim\.max_steps=10\]"):
        load_config(None, ["optim.max_steps=10", "optim.warmup_steps=20"])
    with pytest.raises(ConfigError, match=r"tracking\.log_interval"):
        load_config(None, ["tracking.log_interval=0"])
    with pytest.raises(ConfigError, match=r"scaling\.collective_timeout_s: must be > 0 seconds or null"):
        load_config(None, ["scaling.collective_timeout_s=0"])
    assert load_config(None, ["scaling.collective_timeout_s=null"]).scaling.collective_timeout_s is None


def test_unknown_task_lists_registered_tasks():
    with pytest.raises(ConfigError, match=r"task\.name: unknown task 'nope'; allowed: \[.*'toy'.*\]"):
        load_config(None, ["task.name=nope"])


def test_env_interpolation(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_BUCKET", "s3://bucket/ckpt")
    monkeypatch.delenv("UNSET_VAR_FOR_TEST", raising=False)
    text = "checkpoint: {path: '${CKPT_BUCKET}/run'}\noutput_dir: '${UNSET_VAR_FOR_TEST:-out}'\n"
    path = write(tmp_path / "c.yaml", text)
    cfg = load_config(path)
    assert cfg.checkpoint.path == "s3://bucket/ckpt/run" and cfg.output_dir == "out"
    write(path, "output_dir: '${UNSET_VAR_FOR_TEST}'\n")
    with pytest.raises(ConfigError, match="UNSET_VAR_FOR_TEST is referenced in the config but not set"):
        load_config(path)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_through_dict_and_yaml():
    cfg = load_config(None, ["task.name=toy", "optim.lr=0.5", "tracking.run_name=abc"])
    again = from_dict(Config, to_dict(cfg), "")
    assert again == cfg and cfg.run_name == "abc"
    assert "lr: 0.5" in to_yaml(cfg)
    flat = flatten(to_dict(cfg))
    assert flat["optim.lr"] == 0.5 and flat["task.name"] == "toy"


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1e-3", r"optim\.lr: must be > 0, got -0\.001"),
    ("optim.min_lr=0.01", r"optim\.min_lr: must be <= optim\.lr=0\.001, got 0\.01"),
    ("optim.betas=[0.9]", r"optim\.betas: must be two values \[beta1, beta2\], each in \[0, 1\), got \[0\.9\]"),
    ("optim.betas=[0.9, 1.5]", r"optim\.betas: .* got \[0\.9, 1\.5\]"),
    ("optim.eps=0", r"optim\.eps: must be > 0, got 0\.0"),
    ("optim.weight_decay=-0.1", r"optim\.weight_decay: must be >= 0, got -0\.1"),
    ("data.batch_size=0", r"data\.batch_size: must be >= 1, got 0"),
    ("data.num_workers=-1", r"data\.num_workers: must be >= 0, got -1"),
    ("data.patch_size=0", r"data\.patch_size: must be >= 1, got 0"),
    ("data.std=[0.2, 0.2]", r"data\.std: must be 3 per-channel values \(RGB\)"),
    ("data.scale=[0.9, 0.5]", r"data\.scale: must be \[min, max\] crop-area fractions"),
    ("deepspeed.grad_clip=-1", r"deepspeed\.grad_clip: must be >= 0 \(0 = off\), got -1\.0"),
    ("scaling.cpus_per_worker=-2", r"scaling\.cpus_per_worker: must be >= 0, got -2"),
    ("scaling.max_failures=-3", r"scaling\.max_failures: must be >= 0 restarts, or -1 \(no limit\), got -3"),
    ("model.num_frames=0", r"model\.num_frames: must be >= 1 or null, got 0"),
    ("eval.max_batches=0", r"eval\.max_batches: must be >= 1 or null, got 0"),
    ("max_skipped_steps=-1", r"max_skipped_steps: must be >= 0, got -1"),
    ("data.augment.repeats=0", r"data\.augment\.repeats: must be >= 1, got 0"),
    ("data.augment.random_erasing=1.5", r"data\.augment\.random_erasing: must be a probability in \[0, 1\], got 1\.5"),
    ("data.augment.rand_augment=rand-m7-x3", r"data\.augment\.rand_augment: must be a RandAugment policy .*, got "
                                             r"'rand-m7-x3'"),
    ("data.augment.repeats=3", r"data\.batch_size: must be a multiple of data\.augment\.repeats=3 .*, got 8"),
])  # fmt: skip
def test_values_that_would_fail_later_are_refused_naming_key_value_and_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_min_lr_is_per_base_batch_like_lr():
    scaled = ["optim.lr=1e-4", "optim.base_batch_size=256", "data.batch_size=8", "scaling.num_workers=4"]
    assert load_config(None, [*scaled, "optim.min_lr=1e-5"]).optim.min_lr == 1e-5  # any global batch
    with pytest.raises(ConfigError, match=r"optim\.min_lr: must be <= optim\.lr=1e-05, got 2e-05"):
        load_config(None, [*scaled, "optim.min_lr=2e-5", "optim.lr=1e-5"])


def test_broken_yaml_names_the_file_and_the_line(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.1\n  betas: [0.9, 0.95\ndata: {batch_size: 4}\n")
    stage = write(tmp_path / "stage.yaml", "defaults: [base.yaml]\n")
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'base.yaml'}: not valid YAML \(line 4, column 5: "):
        load_config(stage)
    with pytest.raises(ConfigError, match=r"^override 'optim.betas=\[0.9,': not valid YAML \(line 1, column 6: "):
        load_config(None, ["optim.betas=[0.9,"])


def test_string_fields_take_plain_numbers_as_written(tmp_path):
    """`run_name=20241201` was refused (YAML reads it as an int); `010` and `1.50` would have come back as 8 and
    1.5 had the values been converted instead of read from their text."""
    cfg = load_config(None, ["tracking.run_name=20241201", "stage=010", "tracking.experiment=1.50",
                             "output_dir=2024-12-01", "data.train_shards=[001, 002]", "optim.max_steps=010"])
    assert (cfg.tracking.run_name, cfg.stage, cfg.tracking.experiment) == ("20241201", "010", "1.50")
    assert cfg.output_dir == "2024-12-01" and cfg.data.train_shards == ["001", "002"]
    assert cfg.optim.max_steps == 8 and type(cfg.optim.max_steps) is int  # non-string fields keep YAML's typing
    text = "task: {name: toy}\ntracking: {run_name: 0x1F}\nstage: 1_000\ncheckpoint: {storage_options: {port: 9}}\n"
    path = write(tmp_path / "c.yaml", text)
    from_file = load_config(path)
    assert (from_file.tracking.run_name, from_file.stage) == ("0x1F", "1_000")
    assert type(from_file.checkpoint.storage_options["port"]) is int
    assert from_dict(Config, to_dict(from_file), "") == from_file and "run_name: '0x1F'" in to_yaml(from_file)
    # `str | None` reports the str error itself, not "True matches none of the allowed types: <the same key>: ..."
    with pytest.raises(ConfigError, match=r"^tracking\.run_name: expected a string, got True \(YAML reads"):
        load_config(None, ["tracking.run_name=yes"])
    assert load_config(None, ["tracking.run_name=null"]).tracking.run_name is None


def test_raw_trees_dump_numbers_as_written(tmp_path):
    import yaml

    from pipeline.config import load_yaml_tree

    tree = load_yaml_tree(write(tmp_path / "r.yaml", "a: 010\nb: 1.50\nc: [7, 2024-12-01]\n"))
    assert yaml.safe_dump(tree, default_flow_style=True).strip() == "{a: 010, b: 1.50, c: [7, '2024-12-01']}"


def test_literal_fields_do_not_mix_booleans_and_integers():
    with pytest.raises(ConfigError, match=r"scaling\.use_gpu: 1 is not allowed; choose one of \['auto', True, False\]"):
        load_config(None, ["scaling.use_gpu=1"])
    assert load_config(None, ["scaling.use_gpu=true"]).scaling.use_gpu is True
