"""End to end on real images (rs_mini): train -> checkpoint -> interrupt/resume (same loss curve) -> msa-eval."""

import json
from pathlib import Path

import pytest
import torch

from msa.train import (
    TrainConfig,
    config_from_args,
    load_config,
    make_scheduler,
    prepare_splits,
    summarize_seeds,
    train,
)

REPO = Path(__file__).resolve().parents[1]
MINI = REPO.parent / "shared" / "data" / "rs_mini"
needs_mini = pytest.mark.skipif(not MINI.is_dir(), reason=f"rs_mini images not found at {MINI}")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy CI machine oversubscribed OpenMP threads spin
    (measured: this module 108 s with 2 threads vs 27 s with 1 at load average 4 on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ucm_mini(tmp_path_factory):
    """rs_mini's 9 UCM images with their real captions, split 5 train / 2 val / 2 test."""
    data = json.loads((MINI / "ucm" / "dataset.json").read_text())
    for index, record in enumerate(data["images"]):
        record["split"] = "train" if index < 5 else "val" if index < 7 else "test"
    path = tmp_path_factory.mktemp("ucm") / "dataset.json"
    path.write_text(json.dumps(data))
    return path


def _config(annotations, output_dir, **overrides):
    values = dict(
        model="msa-tiny",
        dataset="ucm",
        annotations=str(annotations),
        image_root=str(MINI / "ucm" / "images"),
        epochs=2,
        batch_size=8,  # 25 train captions -> 3 steps per epoch
        lr=1e-3,
        workers=0,
        output_dir=str(output_dir),
        progress=False,
        tensorboard=False,
        eval_batch_size=4,
        model_overrides={"backend": "reference"},
    )
    values.update(overrides)
    return TrainConfig(**values)


def _losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "train_log.jsonl").read_text().splitlines()]
    return [(r["step"], r["epoch"], r["loss"], r["triplet"], r["alignment"], r["consistency"]) for r in rows]


@needs_mini
@pytest.mark.parametrize("preset, augment, dropout", [("paper", [], 0.0), ("improved", ["flip", "rot90"], 0.2)])
def test_interrupt_and_resume_gives_the_same_loss_curve(ucm_mini, tmp_path, preset, augment, dropout, capsys):
    from msa.configs import TINY_BERT

    # Dropout in the text encoder: the resumed run must also restore the global RNG stream.
    text_config = {**TINY_BERT, "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    overrides = {"backend": "reference", "text_config": text_config}
    common = dict(preset=preset, augment=augment, save_every_steps=2, model_overrides=overrides)
    full = train(_config(ucm_mini, tmp_path / "full", **common))
    assert full["status"] == "finished" and full["steps"] == 6
    # Interrupted mid-epoch 1 after step 4 (the checkpoint of step 4 is written), then resumed.
    stopped = train(_config(ucm_mini, tmp_path / "split", max_steps=4, **common))
    assert stopped["status"] == "stopped" and stopped["steps"] == 4
    state = torch.load(tmp_path / "split" / "checkpoints" / "last" / "training_state.pt", weights_only=False)
    assert state["state"]["epoch"] == 1 and state["state"]["batch_in_epoch"] == 1
    resumed = train(_config(ucm_mini, tmp_path / "split", resume="auto", **common))
    assert resumed["status"] == "finished" and resumed["steps"] == 6

    curve = _losses(tmp_path / "full")
    assert [row[0] for row in curve] == [1, 2, 3, 4, 5, 6]
    assert _losses(tmp_path / "split") == curve  # bit-identical, logs of the resumed run included
    assert curve[-1][2] != curve[0][2]
    assert resumed["best"] == full["best"]
    for mode in ("global", "mscmat", "fusion", "mscmat_s0"):
        assert resumed["test"][mode] == full["test"][mode]
    assert full["test"]["global"]["num_images"] == 2.0 and full["test"]["global"]["num_texts"] == 10.0

    for name in ("results.md", "results.json", "curves.png", "train_log.csv", "eval_log.jsonl", "config.yaml"):
        assert (tmp_path / "full" / name).is_file(), name
    assert "| global |" in (tmp_path / "full" / "results.md").read_text()
    evals = [json.loads(line) for line in (tmp_path / "full" / "eval_log.jsonl").read_text().splitlines()]
    assert [(e["split"], e["epoch"]) for e in evals] == [("val", 1), ("val", 2), ("test", full["best"]["epoch"])]

    # msa-eval on the best checkpoint reproduces the test metrics of the run.
    from msa.evaluate import main as eval_main

    eval_main(
        [
            "--checkpoint", str(tmp_path / "full"),
            "--dataset", "ucm",
            "--annotations", str(ucm_mini),
            "--image-root", str(MINI / "ucm" / "images"),
            "--split", "test",
            "--batch-size", "4",
            "--output-json", str(tmp_path / "eval.json"),
            "--no-progress",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "| global |" in printed and "| fusion |" in printed and "mR" in printed
    evaluated = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    for mode, metrics in full["test"].items():
        assert evaluated[mode]["mR"] == pytest.approx(metrics["mR"])


@needs_mini
def test_noise_and_carve_out_through_the_config(tmp_path):
    config = TrainConfig(
        dataset="rsicd",
        annotations=str(MINI / "rsicd" / "dataset.json"),
        image_root=str(MINI / "rsicd" / "images"),
        val_fraction=0.25,
        noise_ratio=0.4,
        noise_seed=1,
    )
    splits = prepare_splits(config)
    # rs_mini's RSICD has 22 train images and no val: 6 carved out by image.
    assert splits["train"].num_images == 16 and splits["val"].num_images == 6 and "test" not in splits
    clean = prepare_splits(TrainConfig(**{**config.__dict__, "noise_ratio": 0.0}))
    changed = sum(a != b for a, b in zip(splits["train"].captions, clean["train"].captions))
    assert 0 < changed <= round(0.4 * 80)
    assert splits["val"].captions == clean["val"].captions  # val stays clean


def test_every_shipped_config_parses():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert len(configs) >= 10
    for path in configs:
        config = load_config(path)
        assert config.dataset in ("rsicd", "rsitmd", "ucm", "sydney", "nwpu")
        if "paper" in path.stem:
            # The published hyper-parameters.
            assert (config.lr, config.weight_decay, config.batch_size, config.epochs) == (1e-5, 0.1, 32, 60)
            assert config.lr_schedule == "none" and config.augment == [] and config.preset == "paper"


def test_cli_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: rsitmd\nlr: 2.0e-5\nepochs: 10\nmodel_overrides: {backend: cpu}\n")
    config = config_from_args(
        ["--config", str(path), "--epochs", "3", "--seeds", "1", "2", "--model-override", "num_heads=4",
         "--augment", "flip", "--skip-bad"]
    )  # fmt: skip
    assert (config.dataset, config.lr, config.epochs, config.seeds) == ("rsitmd", 2e-5, 3, [1, 2])
    assert config.model_overrides == {"backend": "cpu", "num_heads": 4}
    assert config.augment == ["flip"] and config.skip_bad is True
    with pytest.raises(ValueError, match="unknown training settings"):
        load_config(None, learning_rate=1.0)
    with pytest.raises(ValueError, match="select_mode"):
        TrainConfig(eval_modes=["global"], select_mode="fusion")
    assert TrainConfig(select_mode="mscmat_s2").select_mode == "mscmat_s2"


def test_lr_schedules():
    parameter = torch.nn.Parameter(torch.zeros(1))
    for schedule, expected_end in (("none", 1.0), ("cosine", 0.0), ("linear", 0.0), ("step", 1e-4)):
        optimizer = torch.optim.SGD([parameter], lr=1.0)
        config = TrainConfig(lr_schedule=schedule, warmup_steps=4, epochs=4, lr_step_epochs=1)
        scheduler = make_scheduler(optimizer, config, steps_per_epoch=10)
        lrs = []
        for _ in range(40):
            lrs.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
        assert scheduler.get_last_lr()[0] == pytest.approx(expected_end, abs=1e-9), schedule


def test_seed_summary_is_mean_and_std():
    results = {
        seed: {"test": {"global": {k: v for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
                                                      "mR", "i2t_medr", "t2i_medr")}}}
        for seed, v in ((1, 10.0), (2, 20.0), (3, 30.0))
    }  # fmt: skip
    summary = summarize_seeds(results)
    assert summary["global"]["mR"] == pytest.approx((20.0, 10.0))


@needs_mini
def test_several_seeds_report_mean_and_std_through_the_cli(ucm_mini, tmp_path, capsys):
    from msa.train import main

    main(
        ["--model", "msa-tiny", "--dataset", "ucm", "--annotations", str(ucm_mini),
         "--image-root", str(MINI / "ucm" / "images"), "--epochs", "1", "--batch-size", "8", "--workers", "0",
         "--seeds", "1", "2", "--eval-modes", "global", "--output-dir", str(tmp_path), "--progress", "false",
         "--tensorboard", "false", "--model-override", "backend=reference"]
    )  # fmt: skip
    assert "| scoring (mean ± std) |" in capsys.readouterr().out
    summary = json.loads((tmp_path / "results.json").read_text())
    values = [summary["seeds"][s]["test"]["global"]["mR"] for s in ("1", "2")]
    mean, std = summary["summary"]["global"]["mR"]
    assert mean == pytest.approx(sum(values) / 2) and std == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    assert all((tmp_path / f"seed_{s}" / "results.md").is_file() for s in (1, 2))
    assert "±" in (tmp_path / "results.md").read_text()
