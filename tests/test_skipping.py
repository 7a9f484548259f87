"""Unreadable images cost their own predictions only, wherever they fall in the batches."""

import logging

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator

from mimm_med.data.skipping import ReadableBatches, SkippingDataset, collate_readable


def _load(item: dict) -> dict:
    if item["image_path"].startswith("bad"):
        raise ValueError("truncated file")
    return {"image": torch.full((1, 2, 2), float(item["value"])), "value": item["value"]}


def _batches(names: list[str], batch_size: int) -> ReadableBatches:
    datalist = [{"image_path": name, "value": index} for index, name in enumerate(names)]
    return ReadableBatches(DataLoader(SkippingDataset(datalist, transform=_load), batch_size=batch_size, collate_fn=collate_readable))


def test_a_batch_made_only_of_unreadable_images_is_left_out_and_the_rest_come_through(caplog):
    # batches of 2: [good0, good1], [bad2, bad3], [good4, bad5], [bad6] — two batches hold nothing readable
    names = ["good0", "good1", "bad2", "bad3", "good4", "bad5", "bad6"]
    with caplog.at_level(logging.WARNING):
        batches = list(_batches(names, batch_size=2))
    assert [batch["value"].tolist() for batch in batches] == [[0, 1], [4]]
    assert all(f"skipped {name}: ValueError: truncated file" in caplog.text for name in names if name.startswith("bad"))


def test_no_readable_image_at_all_is_an_error_that_says_where_to_look():
    with pytest.raises(ValueError, match=r"none of the 3 images could be read .*rerun `mimm-med preprocess`"):
        list(_batches(["bad0", "bad1", "bad2"], batch_size=2))


def test_monai_evaluator_predicts_every_readable_image_when_the_last_batch_is_unreadable():
    names = ["good0", "bad1", "good2", "good3", "bad4"]  # batches of 2: the last holds only bad4
    seen: list[float] = []
    evaluator = SupervisedEvaluator(device="cpu", val_data_loader=_batches(names, batch_size=2), network=torch.nn.Flatten(), decollate=False)
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: seen.extend(engine.state.output["pred"][:, 0].tolist()))
    evaluator.run()
    assert seen == [0.0, 2.0, 3.0]
    assert evaluator.state.iteration == 2
