"""mmgcs/prefix_loaders.py: which stages of a run train a tower's top layers from its cached prefix (text, image or
both, and when none can), and the training batches of the text prefix: rows of similar length together, every row
once, in an order fixed by the seed and the epoch."""

from __future__ import annotations

import torch

from mmgcs.config import TrainConfig
from mmgcs.prefix_loaders import LengthGroupedBatches, prefix_stage_kind
from mmgcs.testing import tiny_model


def test_which_stages_train_from_the_prefix():
    model = tiny_model(fusion="gated")
    tcfg = TrainConfig(text_finetune="partial", text_trainable_layers=1)
    assert prefix_stage_kind(model, tcfg, ("text", "image"), 0) == "text_prefix+image_features"
    assert prefix_stage_kind(model, tcfg, ("text",), 0) == "text_prefix"
    off = [TrainConfig(text_finetune="partial", prefix_cache=False), TrainConfig(text_finetune="partial", cache_features=False),
           TrainConfig(text_finetune="full"), TrainConfig(text_finetune="partial", text_trainable_layers=0),
           TrainConfig(text_finetune="partial", image_finetune="partial"),
           TrainConfig(text_finetune="partial", image_finetune="full")]
    assert [prefix_stage_kind(model, t, ("text", "image"), 0) for t in off] == [None] * len(off)
    two_stage = TrainConfig(text_finetune="partial", freeze_epochs=1)
    assert [prefix_stage_kind(model, two_stage, ("text",), e) for e in (0, 1)] == [None, "text_prefix"]
    lstm = tiny_model(image=False, text_tower="bilstm")
    assert prefix_stage_kind(lstm, tcfg, ("text",), 0) is None


def test_training_batches_group_rows_of_similar_length_in_an_order_fixed_by_seed_and_epoch():
    lengths = torch.randint(3, 129, (1000,), generator=torch.Generator().manual_seed(0))
    batches = LengthGroupedBatches(lengths, batch_size=32, seed=42)

    def epoch(e: int) -> list[list[int]]:
        batches.sampler.set_epoch(e)
        return list(batches)

    first = epoch(0)
    assert len(first) == len(batches) == 32 and sorted(sum(first, [])) == list(range(1000))  # each row once
    assert [len(b) for b in first] == [32] * 31 + [8]  # the short batch last (accelerate shards batches so)
    assert epoch(0) == first and epoch(1) != first  # the order depends on (seed, epoch) only
    padded = sum(len(b) * int(lengths[b].max()) for b in first)
    shuffled = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).split(32)
    assert padded < 0.75 * sum(len(b) * int(lengths[b].max()) for b in shuffled)


def test_which_stages_train_the_image_tower_from_its_prefix():
    model = tiny_model(fusion="gated")
    image = TrainConfig(image_finetune="partial", image_trainable_blocks=1, image_prefix_cache=True)
    assert prefix_stage_kind(model, image, ("text", "image"), 0) == "text_features+image_prefix"
    assert prefix_stage_kind(model, image, ("image",), 0) == "image_prefix"
    both = TrainConfig(text_finetune="partial", text_trainable_layers=1, image_finetune="partial",
                       image_prefix_cache=True)
    assert prefix_stage_kind(model, both, ("text", "image"), 0) == "text_prefix+image_prefix"
    groups = len(model.image_tower.finetune_groups())
    on = {"image_finetune": "partial", "image_prefix_cache": True}
    off = [TrainConfig(**on, image_trainable_blocks=groups), TrainConfig(image_finetune="full"),
           TrainConfig(**on, image_trainable_blocks=0),
           TrainConfig(**on, text_finetune="full"),
           TrainConfig(**on, prefix_cache=False),
           # opt-in: without image_prefix_cache the tower trains whole on augmented posters, as before
           TrainConfig(image_finetune="partial", image_trainable_blocks=1)]
    assert [prefix_stage_kind(model, t, ("text", "image"), 0) for t in off] == [None] * len(off)
    cnn = tiny_model(text=False, image_tower="simplecnn")
    assert prefix_stage_kind(cnn, image, ("image",), 0) is None
