"""What a build hands on: each image it built or found, by digest (publish and smoke take these)."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.build.plan import ImagePlan
from orchestrator.oci import image as image_mod


@dataclass
class BuildResult:
    image: ImagePlan
    content_tag: str
    digest: str
    built: bool
    uploaded_bytes: int = 0
    pushed_layers: int = 0
    reused_layers: int = 0
    seconds: float = 0.0
    assembled: image_mod.Image | None = None  # layers and config, as pushed
    pending: object = None  # the background push, until build() has waited for it

    @property
    def ref(self) -> str:
        return f"{self.image.repository}@{self.digest}"
