"""Architecture only: VideoMamba, its size registry, checkpoint loading. No Ray/DeepSpeed/MLflow/data code."""

from models import videomamba as _sizes  # noqa: F401  (registers the sizes)
from models.checkpoints import LoadReport, export_state_dict, load_pretrained, save_pretrained
from models.registry import create_model, list_models, register_model
from models.videomamba import Features, VideoMamba

__all__ = [
    "Features",
    "LoadReport",
    "VideoMamba",
    "create_model",
    "export_state_dict",
    "list_models",
    "load_pretrained",
    "register_model",
    "save_pretrained",
]
