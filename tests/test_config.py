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
