"""image_classification: a new head of len(labels) outputs on a pretrained vision backbone.

    graft finetune model=hf model.path=/models/vit-base model.task=image_classification \
        data=image_folder data.path=photos/ [data.augment=true]

Records are {image: path, label}; images are decoded when a batch is made, with the
model's own preprocessing (its image processor: resize, crop, normalise). With
``data.augment`` the training batches use a random resized crop and a flip instead of
the fixed crop, drawn from (train seed, epoch, example index): a resumed run sees the
very crops the uninterrupted run saw. Loss, evaluation sums and metrics are the text
classifier's (cross-entropy, accuracy, macro-F1, confusion matrix).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import torch
from transformers import AutoModelForImageClassification

from conf.schema import ConfigError, DataConfig
from jobs.data.images import Preprocess
from jobs.tasks.common import EPOCH_SEED
from jobs.tasks.sequence_classification import SequenceClassification


def image_processor(processor: Any, data: DataConfig) -> Preprocess:
    """The preprocessing a run applies: the processor's, at data.image_size if set."""
    pre = Preprocess.from_processor(processor)
    if data.image_size is None:
        return pre
    side = data.image_size
    # Keep the processor's crop margin: the short side resized to the same share.
    before = pre.shortest_edge or min(pre.resize or pre.size)
    return dataclasses.replace(
        pre,
        size=(side, side),
        resize=None,
        shortest_edge=max(side, round(side * before / min(pre.size))),
    )


class ImageClassification(SequenceClassification):
    name = "image_classification"
    # peft has no image task type: a plain PeftModel, the head kept by modules_to_save.
    peft_task_type = ""
    new_head = True
    modality = "image"
    needs = ""
    generates = False

    def auto_class(self, config: Any, labels: list[str] | None) -> Any:
        super().auto_class(config, labels)  # the label map
        return AutoModelForImageClassification

    def fields(self, data: DataConfig) -> tuple[str, ...]:
        return (data.image_field, data.label_field)

    def labels(
        self, records: list[dict[str, str]], data: DataConfig
    ) -> tuple[list[dict[str, str]], list[str] | None]:
        if data.labels is not None:  # every configured label needs images
            found = {r["label"] for r in records}
            missing = [label for label in data.labels if label not in found]
            if missing:
                raise ConfigError(
                    "data.labels",
                    f"labels {missing} have no images in {data.path}; the labels found "
                    f"there (its folder names or label column): {sorted(found)}",
                )
        return super().labels(records, data)

    def encode(
        self, records: list[dict[str, str]], tokenizer: Any, data: DataConfig, labels: Any
    ) -> list[dict[str, Any]]:
        """``tokenizer`` is the model's image processor. Examples keep the path; pixels
        are made in ``collate``."""
        assert labels is not None
        index = {label: i for i, label in enumerate(labels)}
        unknown = sorted({r["label"] for r in records} - set(index))
        if unknown:
            raise ConfigError(
                "data.labels", f"labels {unknown} are not in the training label set {labels}"
            )
        pre = image_processor(tokenizer, data)
        return [
            {
                "image": r["image"],
                "label": index[r["label"]],
                "index": i,
                "preprocess": pre,
                "augment": data.augment,
            }
            for i, r in enumerate(records)
        ]

    def collate(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        pixels = []
        for e in examples:
            rng = None
            if e["augment"] and EPOCH_SEED in e:  # training batches only
                rng = random.Random(f"{e[EPOCH_SEED]}:{e['index']}")
            pixels.append(e["preprocess"](e["image"], rng))
        return {
            "pixel_values": torch.stack(pixels),
            "labels": torch.tensor([e["label"] for e in examples]),
        }

    def describe_input(self, length: int) -> str:
        return f"{length}x{length} images"

    def input_size(self, model: Any, data: DataConfig) -> int:
        from jobs.models import build_image_processor, hf_config

        return image_processor(build_image_processor(model, hf_config(model)), data).size[0]

    def example_batch(
        self,
        *,
        batch_size: int,
        seq_len: int,
        vocab: int,
        num_labels: int,
        device: Any = None,
        generator: Any = None,
    ) -> dict[str, torch.Tensor]:
        """``seq_len`` is the image side here."""
        shape = (batch_size, 3, seq_len, seq_len)
        if device is not None and torch.device(device).type == "meta":
            return {
                "pixel_values": torch.zeros(shape, device=device),
                "labels": torch.zeros(batch_size, dtype=torch.long, device=device),
            }
        return {
            "pixel_values": torch.randn(shape, generator=generator),
            "labels": torch.randint(0, num_labels, (batch_size,), generator=generator),
        }


TASK = ImageClassification()
