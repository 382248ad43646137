"""TensorBoard event files rebuilt from a committed run's metrics.jsonl carry the same numbers, under the names
`dpo train` logs now (TRL's: eval/rewards/accuracies), whichever version wrote the file."""

import json

import pytest

from dpo.train import events


@pytest.mark.parametrize("validation", [{"split": "eval", "rewards/accuracies": 0.75},
                                        {"split": "val", "rewards/accuracy": 0.75}])  # (an earlier version's)
def test_event_file_from_metrics_has_every_scalar(tmp_path, validation):
    run = tmp_path / "sweep" / "cell"
    run.mkdir(parents=True)
    rows = [{"step": 1, "split": "train", "loss": 0.69, "lr": 1e-5}, {"step": 2, "split": "train", "loss": 0.5},
            {"step": 2, **validation}]
    damaged = '123\n{"step": 1, "split": ["x"]}\n' + "[" * 200_000 + "\n" + '{"step": 3, "spl'  # left out
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + damaged)
    assert events.main([str(tmp_path)]) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("train/loss")] == [(1, 0.69), (2, 0.5)]
    assert acc.Tags()["scalars"] == ["train/loss", "train/lr", "eval/rewards/accuracies"]
    assert [e.value for e in acc.Scalars("eval/rewards/accuracies")] == [0.75]
    assert not events.rebuild(run)  # it has one now: left alone
