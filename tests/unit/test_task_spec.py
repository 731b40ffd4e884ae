"""The task spec (pipeline/tasks/spec.py): one declaration per task that config, recipe and engine read."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from torch import nn

from pipeline.config import Config, ConfigError, TaskConfig, load_config
from pipeline.tasks import TaskSpec, build_task, register_task, task_names, task_spec
from pipeline.tasks import spec as spec_module
from pipeline.tasks.base import Task

REPO = Path(__file__).resolve().parents[2]


@dataclass
class ProbeConfig(TaskConfig):
    width: int = 2
    """Width of the probe's linear layer."""


class ProbeTask(Task):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.model = nn.Linear(width, 1)

    def forward(self, batch):
        return {"loss": self.model(batch["x"]).pow(2).mean()}

    def trainable_module(self) -> nn.Module:
        return self.model


def build_probe(cfg) -> ProbeTask:
    return ProbeTask(cfg.task.width)


@pytest.fixture
def registry(monkeypatch):
    """The real registry, with whatever a test registers removed afterwards."""
    task_names()  # load the catalog first: its tasks stay registered
    monkeypatch.setattr(spec_module, "_SPECS", dict(spec_module._SPECS))
    return spec_module._SPECS


def test_the_stage_tasks_and_what_their_specs_declare():
    assert task_names() == ["classification", "masked_alignment", "self_distill", "toy", "video_text",
                            "video_text_bert"]
    declared = {name: (task_spec(name).init_key, task_spec(name).cuda_graph, task_spec(name).cuda_graph_auto,
                       task_spec(name).evaluates, task_spec(name).own_loader) for name in task_names()}  # fmt: skip
    assert declared == {  # cuda_graph_auto stays off until the graphed step has been compared on a GPU
        "classification": ("model.pretrained", True, False, True, False),
        "masked_alignment": ("model.pretrained", True, True, False, False),
        "self_distill": ("task.teacher_checkpoint", True, False, False, False),
        "toy": ("model.pretrained", False, True, True, True),
        "video_text": ("model.pretrained", True, True, True, False),
        "video_text_bert": ("model.pretrained", True, False, True, False),
    }
    assert all(issubclass(task_spec(name).config, TaskConfig) for name in task_names())
    assert type(load_config(REPO / "configs/stages/toy.yaml").task) is task_spec("toy").config


def test_a_new_task_is_one_declaration_that_config_recipe_and_engine_read(registry, tmp_path):
    from pipeline.recipe import init_key_of, load_recipe

    register_task(TaskSpec(name="probe", config=ProbeConfig, build=build_probe, init_key="model.pretrained"))
    cfg = load_config(None, ["task.name=probe", "task.width=3"])
    assert cfg.task == ProbeConfig(name="probe", width=3) and not cfg.cuda_graph_wanted()
    task = build_task(cfg)
    assert isinstance(task, ProbeTask) and task.model.in_features == 3
    assert task.flops_per_sample() is None  # the base class's default: no TFLOP/s or MFU for it
    with pytest.raises(ConfigError, match=r"task\.widht: unknown key \(did you mean 'width'\?\)"):
        load_config(None, ["task.name=probe", "task.widht=3"])
    with pytest.raises(ConfigError, match="model.cuda_graph: the classification, masked_alignment, self_distill, "
                                          "video_text and video_text_bert tasks"):
        load_config(None, ["task.name=probe", "model.cuda_graph=true"])

    (tmp_path / "probe.yaml").write_text("task: {name: probe}\n")
    (tmp_path / "recipe.yaml").write_text(
        "name: r\nstages:\n  - {name: a, config: probe.yaml}\n  - {name: b, config: probe.yaml, from: a}\n")
    assert init_key_of(load_recipe(tmp_path / "recipe.yaml").stages[1]) == "model.pretrained"


def test_declared_hooks_must_be_the_implemented_ones(registry):
    register_task(TaskSpec(name="probe", config=ProbeConfig, build=build_probe, init_key=None, evaluates=True))
    with pytest.raises(TypeError, match=r"ProbeTask lacks evaluate\(\) but its TaskSpec has evaluates=True"):
        build_task(load_config(None, ["task.name=probe"]))

    class OwnData(ProbeTask):
        def build_loader(self, cfg, split, rank, world_size):
            return iter(())

    register_task(TaskSpec(name="own_data", config=ProbeConfig, build=lambda cfg: OwnData(2), init_key=None))
    with pytest.raises(TypeError, match=r"OwnData implements build_loader\(\) but its TaskSpec has own_loader=False"):
        build_task(load_config(None, ["task.name=own_data"]))


def test_registration_errors_name_what_is_wrong(registry):
    with pytest.raises(TypeError, match=r"register_task takes a TaskSpec\(name=\.\.\., config=\.\.\."):
        register_task("probe")  # the pre-spec decorator form
    register_task(TaskSpec(name="probe", config=ProbeConfig, build=build_probe, init_key=None))
    with pytest.raises(ValueError, match="task 'probe' is registered twice"):
        register_task(TaskSpec(name="probe", config=ProbeConfig, build=lambda cfg: None, init_key=None))
    with pytest.raises(ConfigError, match=r"task\.name: unknown task 'nope'; allowed: \['classification', "
                                          r"'masked_alignment'"):
        load_config(None, ["task.name=nope"])
    with pytest.raises(ValueError, match=r"task\.name: unknown task 'nope'"):
        build_task(Config(task=ProbeConfig(name="nope")))


def test_config_imports_neither_torch_nor_the_stage_modules():
    # The task spec breaks the old config <-> tasks import cycle: parsing a config imports the catalog, not importing
    # pipeline.config.
    code = ("import sys, pipeline.config; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('pipeline.tasks.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.strip() == "['pipeline.tasks.spec']"
