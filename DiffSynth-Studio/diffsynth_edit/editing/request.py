"""What an edit asks for and what it returns: the request, the sampler settings (validated), the prepared inputs the
DiT sees, the result; `EditInputError` names the input that cannot be used."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from PIL import Image

from ..geometry import Box
from ..limits import LBM_MAX_STEPS
from .sampling import FLOW_SCHEDULES


class EditInputError(ValueError):
    """The edit request cannot be used; the message says which input and why."""


@dataclass
class EditRequest:
    image: Image.Image | None
    prompt: str
    mask: Image.Image | None = None
    references: Sequence[Image.Image] = ()
    negative_prompt: str = ""


@dataclass
class EditSettings:
    sampler: Literal["flow", "lbm"] = "flow"
    steps: int = 40
    cfg_scale: float = 4.0
    seed: int = 0
    blend_alpha: float = 0.0
    max_pixels: int = 1024 * 1024
    batch_cfg: bool = True  # batch the CFG pair into one forward when the prompts' lengths match (see predict)
    schedule: Literal["qwen", "lightning"] = "qwen"  # flow sigmas: Qwen's dynamic shift, or Lightning's shift 3

    def validate(self) -> None:
        if self.sampler not in ("flow", "lbm"):
            raise EditInputError(f"sampler must be 'flow' or 'lbm', got {self.sampler!r}")
        if self.steps < 1 or (self.sampler == "lbm" and self.steps > LBM_MAX_STEPS):
            raise EditInputError(f"steps={self.steps} is out of range (flow ≥ 1, LBM 1–{LBM_MAX_STEPS})")
        if self.cfg_scale < 1.0:
            raise EditInputError(f"cfg_scale must be ≥ 1, got {self.cfg_scale}")
        if not 0.0 <= self.blend_alpha <= 1.0:
            raise EditInputError(f"blend_alpha must be in [0, 1], got {self.blend_alpha}")
        if self.max_pixels < 256:
            raise EditInputError("max_pixels must be at least 256")
        if self.schedule not in FLOW_SCHEDULES:
            raise EditInputError(f"schedule must be one of {', '.join(FLOW_SCHEDULES)}, got {self.schedule!r}")


@dataclass
class PreparedEdit:
    source: Image.Image
    references: list[Image.Image]
    mask: Image.Image | None
    box: Box
    edit_latents: list[torch.Tensor]
    prompt_emb: torch.Tensor
    prompt_mask: torch.Tensor
    nega_emb: torch.Tensor
    nega_mask: torch.Tensor
    mask_latent: torch.Tensor  # [1, 1, H/8, W/8], 1 = edit region
    notices: list[str] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        return self.source.size

    @property
    def subyx(self) -> torch.Tensor:
        return torch.tensor([self.box.to_subyx()])


@dataclass
class EditResult:
    image: Image.Image
    sub_image: Image.Image | None
    settings: dict
    notices: list[str]
    latents: torch.Tensor
    sub_latents: torch.Tensor | None

    def __iter__(self):  # `image, sub_image = editor.edit(...)`
        return iter((self.image, self.sub_image))
