"""Watermarking methods behind one interface, so the robustness evaluation treats ours and
peers alike.

A method embeds ``message_length`` bits into a uint8 RGB image and extracts them back.
``image_size`` is the square size it works at (None: any size); the evaluation brings images
to it first and says so. Methods:

- :class:`MBRSMethod`: an :class:`~vision.watermark.mbrs.MBRS` model (ours; also the
  HiDDeN-style baseline, which is the same class without SE blocks), from a checkpoint
  written by :func:`save_mbrs` or a model in memory; ``strength`` scales the residual.
  ``builtin:<name>`` names weights shipped in ``vision/watermark/weights/`` (see the README
  there for the command that trained each).
  An image of another size (after a resize or crop attack) is resized back to
  ``image_size`` before decoding.
- :class:`InvisibleWatermarkMethod`: the ``invisible-watermark`` package's ``dwtDct``,
  ``dwtDctSvd`` and ``rivaGan`` (RivaGAN's ONNX weights ship in that package; 32 bits).
  The package refuses images under 256 x 256, so these work at 256 (``image_size``).
  Install the ``peers`` extra.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np


class WatermarkMethod(ABC):
    name: str
    message_length: int
    image_size: int | None

    @abstractmethod
    def embed(self, image: np.ndarray, bits: np.ndarray) -> np.ndarray:
        """uint8 ``[H, W, 3]`` RGB (of ``image_size`` when set) and ``{0, 1}`` bits -> watermarked image."""

    @abstractmethod
    def extract(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB of any size -> ``message_length`` bits in {0, 1}."""


WEIGHTS = Path(__file__).resolve().parent / "weights"
BUILTIN = "builtin:"


def builtin_weights() -> list[str]:
    """Names of the MBRS weights that ship with raysmith (``builtin:<name>``)."""
    return sorted(path.stem for path in WEIGHTS.glob("*.pt"))


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A checkpoint path; ``builtin:<name>`` is the shipped ``weights/<name>.pt``."""
    text = str(checkpoint)
    if not text.startswith(BUILTIN):
        return Path(checkpoint)
    name = text[len(BUILTIN):]
    path = WEIGHTS / f"{name}.pt"
    if name not in builtin_weights():
        raise ValueError(f"no built-in MBRS weights '{name}'; available: "
                         f"{', '.join(BUILTIN + n for n in builtin_weights()) or 'none'}")
    return path


def save_mbrs(model, path: str | Path, **extra) -> Path:
    """A checkpoint :class:`MBRSMethod` reads: weights and the constructor's arguments."""
    import torch

    torch.save({"mbrs": model.config, "model": model.state_dict(), **extra}, Path(path))
    return Path(path)


class MBRSMethod(WatermarkMethod):
    def __init__(self, model=None, checkpoint: str | Path | None = None, strength: float = 1.0, name: str = "mbrs",
                 threads: int | None = None):
        import torch

        from vision.watermark.mbrs import MBRS

        if threads:
            torch.set_num_threads(threads)
        if model is None:
            if checkpoint is None:
                raise ValueError("MBRSMethod needs a model or a checkpoint")
            state = torch.load(resolve_checkpoint(checkpoint), map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "mbrs" not in state:
                raise ValueError(f"{checkpoint} is not an MBRS checkpoint (no 'mbrs' settings); write it with save_mbrs")
            model = MBRS(**state["mbrs"])
            model.load_state_dict(state["model"])
        self.model = model.eval()
        self.name, self.strength = name, strength
        self.message_length, self.image_size = model.message_length, model.size

    def _tensor(self, image: np.ndarray):
        import torch
        from PIL import Image

        if image.shape[:2] != (self.image_size, self.image_size):
            image = np.asarray(Image.fromarray(image).resize((self.image_size, self.image_size), Image.BILINEAR))
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0

    def embed(self, image: np.ndarray, bits: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.model.embed(self._tensor(image), torch.as_tensor(bits)[None], self.strength)
        return (out[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()

    def extract(self, image: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model.extract(self._tensor(image))[0].numpy()


class InvisibleWatermarkMethod(WatermarkMethod):
    """The ``invisible-watermark`` package (it works on BGR arrays; converted here)."""

    KINDS = ("dwtDct", "dwtDctSvd", "rivaGan")

    MIN_SIZE = 256
    """The package refuses smaller images."""

    def __init__(self, kind: str = "dwtDct", message_length: int = 32, image_size: int | None = None):
        if kind not in self.KINDS:
            raise ValueError(f"unknown invisible-watermark method '{kind}'; available: {', '.join(self.KINDS)}")
        try:
            from imwatermark import WatermarkDecoder, WatermarkEncoder
        except ImportError as err:
            raise ImportError("the invisible-watermark peers need the 'peers' extra: pip install 'raysmith[peers]'") from err
        if kind == "rivaGan":
            if message_length != 32:
                raise ValueError(f"RivaGAN carries exactly 32 bits, not {message_length}")
            WatermarkEncoder.loadModel()
            WatermarkDecoder.loadModel()
        self.kind, self.name = kind, kind
        if image_size is not None and image_size < self.MIN_SIZE:
            raise ValueError(f"invisible-watermark needs images of at least {self.MIN_SIZE} px, not {image_size}")
        self.message_length, self.image_size = message_length, image_size or self.MIN_SIZE
        self._encoder_class, self._decoder_class = WatermarkEncoder, WatermarkDecoder

    def embed(self, image: np.ndarray, bits: np.ndarray) -> np.ndarray:
        encoder = self._encoder_class()
        encoder.set_watermark("bits", [int(b) for b in bits])
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        return np.ascontiguousarray(encoder.encode(bgr, self.kind)[:, :, ::-1]).astype(np.uint8)

    def extract(self, image: np.ndarray) -> np.ndarray:
        if image.shape[:2] != (self.image_size, self.image_size):  # after a crop or a resize: back to the working size
            from PIL import Image

            image = np.asarray(Image.fromarray(image).resize((self.image_size, self.image_size), Image.BILINEAR))
        decoder = self._decoder_class("bits", self.message_length)
        bits = decoder.decode(np.ascontiguousarray(image[:, :, ::-1]), self.kind)
        return np.asarray([int(bool(b)) for b in bits], dtype=np.int64)


def build_method(name: str, checkpoint: str | None = None, strength: float = 1.0, message_length: int = 32,
                 image_size: int | None = None, threads: int | None = None) -> WatermarkMethod:
    """``mbrs``/``hidden`` (a checkpoint), or ``dwtDct``/``dwtDctSvd``/``rivaGan``."""
    if name in ("mbrs", "hidden"):
        return MBRSMethod(checkpoint=checkpoint, strength=strength, name=name, threads=threads)
    if name in InvisibleWatermarkMethod.KINDS:
        return InvisibleWatermarkMethod(name, message_length, image_size)
    raise ValueError(f"unknown watermark method '{name}'; available: mbrs, hidden, {', '.join(InvisibleWatermarkMethod.KINDS)}")
