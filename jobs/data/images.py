"""Image data: an image folder or a file of image paths, checked before Ray starts, and
the model's own preprocessing (plus optional train-time augmentation) without torchvision.

    python -c "from jobs.data import images; r = images.read_folder('photos', key='data.path'); \
        images.check_images(r, key='data.path'); print(len(r), sorted({x['label'] for x in r}))"

Two layouts, as the torchvision / Hugging Face ``imagefolder`` convention has them:
``root/<label>/*.png|jpg|...`` (the sub-folder is the label; nested folders below it
belong to the same label), or a JSONL/CSV file with an image path column
and a label column, paths relative to the file's folder (``resolve``). Every
image is opened (header and, for PNG, checksums) on the driver, so an unreadable or
non-image file is named with its path before any cluster resource is taken.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conf.schema import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def read_folder(root: str | Path, *, key: str) -> list[dict[str, str]]:
    """``[{image: path, label: sub-folder name}]`` in a stable order (sorted paths)."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise ConfigError(
            key, f"{root} is not a directory; an image folder is root/<label>/*.png|jpg"
        )
    loose = sorted(p.name for p in base.iterdir() if p.is_file() and _visible(p, base))
    if loose:
        raise ConfigError(
            key,
            f"{base} has files at its top level ({', '.join(loose[:3])}); an image folder "
            "holds one sub-folder per label, the images inside it",
        )
    records = []
    for folder in sorted(d for d in base.iterdir() if d.is_dir() and _visible(d, base)):
        found = sorted(p for p in folder.rglob("*") if p.is_file() and _visible(p, folder))
        if not found:
            raise ConfigError(
                key,
                f"{folder}: label folder {folder.name!r} holds no images; give it some or "
                "remove it (every sub-folder of an image folder is a class)",
            )
        for path in found:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise ConfigError(
                    key,
                    f"{path}: not an image file (allowed suffixes: {', '.join(IMAGE_SUFFIXES)})",
                )
            records.append({"image": str(path), "label": folder.name})
    if not records:
        raise ConfigError(key, f"{base} has no images in label sub-folders (root/<label>/*.png)")
    return records


def resolve(
    records: list[dict[str, str]], listing: str | Path, field: str = "image"
) -> list[dict[str, str]]:
    """Image paths of a JSONL/CSV listing made absolute against the listing's folder."""
    folder = Path(listing).expanduser().resolve().parent
    return [{**r, field: str((folder / Path(r[field]).expanduser()).resolve())} for r in records]


def check_images(records: Sequence[dict[str, str]], *, key: str) -> None:
    """ConfigError naming the first path that is missing, not an image, or unreadable."""
    from PIL import Image, UnidentifiedImageError

    for record in records:
        path = Path(record["image"])
        if not path.is_file():
            raise ConfigError(key, f"{path}: no such image file")
        try:
            with Image.open(path) as image:
                image.verify()  # header and checksums, without decoding every pixel
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ConfigError(key, f"{path}: not a readable image ({e})") from None


@dataclass(frozen=True)
class Preprocess:
    """Resize, centre-crop and normalise as the checkpoint was trained (from its image
    processor), and, for training, a random resized crop and a horizontal flip instead
    of the fixed crop."""

    size: tuple[int, int]  # (height, width) the model sees
    resize: tuple[int, int] | None  # fixed (height, width) before the crop ...
    shortest_edge: int | None  # ... or the shorter side scaled to this (aspect kept)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rescale: float = 1 / 255
    # Random resized crop: the crop's share of the image area and its aspect ratio.
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @classmethod
    def from_processor(cls, processor: Any) -> Preprocess:
        """From a transformers image processor (ViTImageProcessor, ConvNextImageProcessor,
        EfficientNetImageProcessor, CLIPImageProcessor, ...): its size, crop and stats."""

        def hw(spec: Any) -> tuple[int, int] | None:
            if spec is None:
                return None
            if isinstance(spec, int):
                return (spec, spec)
            spec = dict(spec)
            if "height" in spec and "width" in spec:
                return (int(spec["height"]), int(spec["width"]))
            return None

        size = dict(getattr(processor, "size", None) or {})
        crop = (
            hw(getattr(processor, "crop_size", None))
            if getattr(processor, "do_center_crop", False)
            else None
        )
        resize = hw(size)
        shortest = size.get("shortest_edge")
        crop_pct = getattr(processor, "crop_pct", None)
        if crop is None and resize is None and shortest is not None:
            side = int(shortest)
            crop = (side, side)  # a square input
            if crop_pct is not None:  # ConvNeXt/ResNet: scale to side / crop_pct, then crop
                if side < 384:
                    shortest = int(side / crop_pct)
                else:  # large inputs: warped to the square, no crop
                    crop, resize, shortest = (side, side), (side, side), None
        target = crop or resize
        if target is None:
            raise ValueError(
                f"image processor {type(processor).__name__}: no output size in {size}"
            )
        mean = tuple(float(m) for m in (getattr(processor, "image_mean", None) or (0.5,) * 3))
        std = tuple(float(s) for s in (getattr(processor, "image_std", None) or (0.5,) * 3))
        if not getattr(processor, "do_normalize", True):
            mean, std = (0.0,) * len(mean), (1.0,) * len(std)
        return cls(
            size=target,
            resize=resize,
            shortest_edge=int(shortest) if shortest is not None and resize is None else None,
            mean=mean,
            std=std,
            rescale=float(getattr(processor, "rescale_factor", 1 / 255) or 1 / 255),
        )

    def __call__(self, path: str | Path, rng: random.Random | None = None) -> torch.Tensor:
        """The image at ``path`` as a float32 [3, H, W] tensor; ``rng`` turns on the
        training augmentation (the same rng sequence gives the same crops)."""
        from PIL import Image

        with Image.open(path) as image:
            rgb = _rgb(image)
        if rng is not None:
            rgb = self._random_crop(rgb, rng)
        else:
            rgb = self._resize(rgb)
            rgb = _centre_crop(rgb, self.size)
        mean = np.array(self.mean, dtype=np.float32)
        std = np.array(self.std, dtype=np.float32)
        pixels = (np.asarray(rgb, dtype=np.float32) * np.float32(self.rescale) - mean) / std
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def _resize(self, image: Any) -> Any:
        from PIL import Image

        if self.resize is not None:
            height, width = self.resize
        elif self.shortest_edge is not None:
            scale = self.shortest_edge / min(image.size)
            width, height = round(image.width * scale), round(image.height * scale)
        else:
            height, width = self.size
        if (width, height) == image.size:
            return image
        return image.resize((max(width, 1), max(height, 1)), Image.Resampling.BILINEAR)

    def _random_crop(self, image: Any, rng: random.Random) -> Any:
        from PIL import Image, ImageOps

        width, height = image.size
        area = width * height
        box = (0, 0, width, height)
        log_ratio = (math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]))
        for _ in range(10):  # as torchvision's RandomResizedCrop: try, else the whole image
            target = area * rng.uniform(*self.crop_scale)
            ratio = math.exp(rng.uniform(*log_ratio))
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                left, top = rng.randint(0, width - w), rng.randint(0, height - h)
                box = (left, top, left + w, top + h)
                break
        out_h, out_w = self.size
        image = image.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box)
        return ImageOps.mirror(image) if rng.random() < 0.5 else image


def _rgb(image: Any) -> Any:
    """RGB, transparency composited onto white (as transformers' convert_to_rgb does:
    an icon's transparent background is white, not whatever colour lies under it)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _centre_crop(image: Any, size: tuple[int, int]) -> Any:
    height, width = size
    if image.size == (width, height):
        return image
    if image.width < width or image.height < height:  # pad up, as the processors do
        from PIL import Image

        canvas = Image.new("RGB", (max(width, image.width), max(height, image.height)))
        canvas.paste(
            image, ((canvas.width - image.width) // 2, (canvas.height - image.height) // 2)
        )
        image = canvas
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))
