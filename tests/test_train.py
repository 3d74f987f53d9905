"""msa-train and msa-eval end to end on a small synthetic dataset (generated here, so the tests run on a fresh
clone): train -> checkpoint -> interrupt (also kill -9 mid-checkpoint) / resume (same loss curve) -> msa-eval; the
errors a user can make, named in one line. Real images (rs_mini) add a layer when present."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from synthetic_data import write_synthetic_dataset

from msa.training import (
    TrainConfig,
    UsageError,
    config_from_args,
    load_config,
    make_scheduler,
    prepare_splits,
    read_jsonl,
    recover_checkpoint,
    save_checkpoint,
    summarize_seeds,
    train,
)
from msa.training.config import changed_settings
from msa.training.main import main

REPO = Path(__file__).resolve().parents[1]
# The real-data folder: MSA_SHARED_DATA, else the checkout's neighbour shared/data.
MINI = Path(os.environ.get("MSA_SHARED_DATA") or REPO.parent / "shared" / "data") / "rs_mini"
needs_mini = pytest.mark.skipif(not MINI.is_dir(), reason="real images (rs_mini) not available; set MSA_SHARED_DATA")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy CI machine oversubscribed OpenMP threads spin
    (measured: this module 108 s with 2 threads vs 27 s with 1 at load average 4 on 2 cores). Module-scoped, so
    that it is in force before the module-scoped runs too: a curve is bit-identical only at the same thread count
    (the CPU kernel's tiles depend on it), and the killed child processes run with OMP_NUM_THREADS=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """5 train / 2 val / 2 test images, 5 captions each (read only: tests that break files write their own)."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), "karpathy", num_images=9)


def _config(data, output_dir, **overrides):
    values = dict(
        model="msa-tiny",
        dataset=data.dataset,
        annotations=str(data.annotations),
        image_root=str(data.image_root),
        epochs=2,
        batch_size=8,  # 25 train captions -> 3 steps per epoch
        lr=1e-3,
        workers=0,
        output_dir=str(output_dir),
        progress=False,
        tensorboard=False,
        eval_batch_size=4,
        backend="reference",
    )
    values.update(overrides)
    return TrainConfig(**values)


def _cli(data, output_dir, *extra):
    return [
        "--model", "msa-tiny", "--dataset", data.dataset, "--annotations", str(data.annotations),
        "--image-root", str(data.image_root), "--epochs", "2",
        "--batch-size", "8", "--lr", "1e-3", "--workers", "0", "--output-dir", str(output_dir),
        "--tensorboard", "false", "--eval-batch-size", "4", "--backend", "reference", *extra,
    ]  # fmt: skip


def _losses(run_dir):
    rows = read_jsonl(Path(run_dir) / "train_log.jsonl")
    return [(r["step"], r["epoch"], r["loss"], r["triplet"], r["alignment"], r["consistency"]) for r in rows]


@pytest.fixture(scope="module")
def reference_run(synthetic, tmp_path_factory):
    """One uninterrupted run (saving every 2 steps), the curve the interrupted runs must reproduce."""
    output_dir = tmp_path_factory.mktemp("full")
    result = train(_config(synthetic, output_dir, save_every_steps=2))
    return output_dir, result


@pytest.mark.parametrize("preset, augment, dropout", [("paper", [], 0.0), ("improved", ["flip", "rot90"], 0.2)])
def test_interrupt_and_resume_gives_the_same_loss_curve(synthetic, tmp_path, preset, augment, dropout, capsys):
    from msa.configs import TINY_BERT

    # Dropout in the text encoder: the resumed run must also restore the global RNG stream.
    text_config = {**TINY_BERT, "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    common = dict(preset=preset, augment=augment, save_every_steps=2, model_overrides={"text_config": text_config})
    full = train(_config(synthetic, tmp_path / "full", **common))
    assert full["status"] == "finished" and full["steps"] == 6
    # Interrupted mid-epoch 2 after step 4 (the checkpoint of step 4 is written), then resumed.
    stopped = train(_config(synthetic, tmp_path / "split", max_steps=4, **common))
    assert stopped["status"] == "stopped" and stopped["steps"] == 4
    state = torch.load(tmp_path / "split" / "checkpoints" / "last" / "training_state.pt", weights_only=False)
    assert state["state"]["epoch"] == 1 and state["state"]["batch_in_epoch"] == 1
    resumed = train(_config(synthetic, tmp_path / "split", resume="auto", **common))
    assert resumed["status"] == "finished" and resumed["steps"] == 6

    curve = _losses(tmp_path / "full")
    assert [row[:2] for row in curve] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]  # epochs from 1
    assert _losses(tmp_path / "split") == curve  # bit-identical, logs of the resumed run included
    assert curve[-1][2] != curve[0][2]
    assert resumed["best"] == full["best"] and full["best"]["epoch"] in (1, 2)
    for mode in ("global", "mscmat", "fusion", "mscmat_s0"):
        assert resumed["test"][mode] == full["test"][mode]
    assert full["test"]["global"]["num_images"] == 2.0 and full["test"]["global"]["num_texts"] == 10.0

    for name in ("results.md", "results.json", "curves.png", "train_log.csv", "eval_log.jsonl", "config.yaml"):
        assert (tmp_path / "full" / name).is_file(), name
    results_md = (tmp_path / "full" / "results.md").read_text()
    assert "| global |" in results_md and f"preset {preset}," in results_md
    evals = read_jsonl(tmp_path / "full" / "eval_log.jsonl")
    assert [(e["split"], e["epoch"]) for e in evals] == [("val", 1), ("val", 2), ("test", full["best"]["epoch"])]

    # msa-eval on the best checkpoint reproduces the test metrics of the run.
    from msa.evaluate import main as eval_main

    code = eval_main(
        ["--checkpoint", str(tmp_path / "full"), "--dataset", "karpathy", "--annotations",
         str(synthetic.annotations), "--image-root", str(synthetic.image_root), "--split", "test", "--batch-size",
         "4", "--output-json", str(tmp_path / "eval.json"), "--backend", "reference"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| global |" in printed and "| fusion |" in printed and "mR" in printed
    evaluated = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    for mode, metrics in full["test"].items():
        assert evaluated[mode]["mR"] == pytest.approx(metrics["mR"])


# ------------------------------------------------------------------------------------------ atomic checkpoints
class _FakeModel:
    def save_pretrained(self, directory):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "model.safetensors").write_bytes(b"weights")


def _state(step):
    return {"state": {"step": step, "epoch": 0}}


class _Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at", ["write", 0, 1, "cleanup"])
def test_checkpoint_replace_leaves_a_complete_checkpoint_at_every_point(tmp_path, monkeypatch, crash_at):
    """A crash at every point of replacing ``last`` (step 3 by step 5) leaves a checkpoint that recovery finds."""
    import msa.training.checkpoint as checkpoint

    last = tmp_path / "last"
    save_checkpoint(last, _FakeModel(), _state(3))
    real_replace, real_rmtree, calls = os.replace, checkpoint.shutil.rmtree, []

    def replace(source, target):
        calls.append(target)
        if crash_at == len(calls) - 1:
            raise _Crash
        real_replace(source, target)

    def rmtree(path, *args, **kwargs):
        if crash_at == "cleanup" and Path(path).name == "last.old":
            raise _Crash
        real_rmtree(path, *args, **kwargs)

    def torch_save(obj, path):
        Path(path).write_bytes(b"half a fi")  # a torn write
        raise _Crash

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    if crash_at == "write":
        monkeypatch.setattr(checkpoint.torch, "save", torch_save)
    with pytest.raises(_Crash):
        save_checkpoint(last, _FakeModel(), _state(5))
    monkeypatch.undo()
    found = recover_checkpoint(last)
    assert found == last
    expected = 3 if crash_at == "write" else 5  # the newest complete one
    assert json.loads((last / "checkpoint.json").read_text())["step"] == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    save_checkpoint(last, _FakeModel(), _state(7))  # and the next save works from the repaired state
    assert recover_checkpoint(last) == last and sorted(p.name for p in tmp_path.iterdir()) == ["last"]


KILL_SCRIPT = """
import os, signal, sys
import msa.training.checkpoint as checkpoint
from msa.training.main import main
real_replace, saves = os.replace, []
def replace(source, target):
    source, target = str(source), str(target)
    if target.endswith("last.old"):
        saves.append(target)
    # Killed at the third replace of checkpoints/last, at the chosen point.
    if len(saves) == 3 and (target.endswith("last") and "{point}" == "between" or target.endswith("last.old")
                            and "{point}" == "before"):
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(source, target)
checkpoint.os.replace = replace
sys.exit(main(sys.argv[1:]))
"""


# "between" leaves the hardest state (no `last` at all); the unit test above covers every other point.
@pytest.mark.parametrize("point", ["between"])
def test_kill_9_while_replacing_the_checkpoint_then_resume_continues(synthetic, reference_run, tmp_path, point):
    """kill -9 while checkpoints/last is replaced (3rd save: step 4), then --resume auto: the run continues from the
    newest complete checkpoint and ends with the loss curve of an uninterrupted run."""
    full_dir, full = reference_run
    run_dir = tmp_path / "run"
    args = _cli(synthetic, run_dir, "--save-every-steps", "2", "--progress", "false")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT.replace("{point}", point), *args], env=env, capture_output=True, text=True
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    leftovers = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert leftovers == (["best", "last", "last.new"] if point == "before" else ["best", "last.new", "last.old"])
    # Without --resume a folder holding checkpoints is refused, naming the way out.
    with pytest.raises(UsageError, match="--resume auto"):
        train(_config(synthetic, run_dir, save_every_steps=2))
    resumed = train(_config(synthetic, run_dir, save_every_steps=2, resume="auto"))
    assert resumed["status"] == "finished" and resumed["steps"] == 6
    assert _losses(run_dir) == _losses(full_dir)
    assert resumed["best"] == full["best"] and resumed["test"]["global"] == full["test"]["global"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best", "last"]


def test_resume_never_starts_over(synthetic, tmp_path):
    train(_config(synthetic, tmp_path, max_steps=2, eval_modes=["global"]))
    again = train(_config(synthetic, tmp_path, max_steps=1, eval_modes=["global"], resume="never"))
    assert again["steps"] == 1 and [r[0] for r in _losses(tmp_path)] == [1]


# ------------------------------------------------------------------------------------------ changed settings
def test_resume_refuses_changed_settings_and_keeps_config_yaml(synthetic, tmp_path, capsys):
    stopped = train(_config(synthetic, tmp_path, max_steps=2, eval_modes=["global"]))
    assert stopped["status"] == "stopped"
    saved_yaml = (tmp_path / "config.yaml").read_text()
    code = main(_cli(synthetic, tmp_path, "--eval-modes", "global", "--resume", "auto", "--lr", "0.5",
                     "--batch-size", "4", "--progress", "false"))  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and "Traceback" not in error
    assert "lr: 0.001 -> 0.5" in error and "batch_size: 8 -> 4" in error
    assert (tmp_path / "config.yaml").read_text() == saved_yaml
    # Runtime settings may change (and more epochs with a constant learning rate); config.yaml says what ran.
    resumed = train(
        _config(synthetic, tmp_path, eval_modes=["global"], resume="auto", epochs=3, eval_batch_size=2, workers=0)
    )
    assert resumed["steps"] == 9
    assert "epochs: 3" in (tmp_path / "config.yaml").read_text()


def test_changed_settings_ignore_the_runtime_choices():
    saved = TrainConfig(backend="cpu", model_overrides={"backend": "cpu", "num_heads": 4}, lr=1e-3).__dict__
    assert changed_settings(saved, TrainConfig(backend="reference", model_overrides={"num_heads": 4}, lr=1e-3,
                                               workers=0, device="cpu", max_steps=3)) == []  # fmt: skip
    changes = changed_settings(saved, TrainConfig(model_overrides={"num_heads": 2}, lr=1e-3, seed=1))
    assert changes == ["model_overrides: {'num_heads': 4} -> {'num_heads': 2}", "seed: 0 -> 1"]
    cosine = TrainConfig(lr_schedule="cosine").__dict__
    assert changed_settings(cosine, TrainConfig(lr_schedule="cosine", epochs=61)) == ["epochs: 60 -> 61"]


# ---------------------------------------------------------------------------------------- logs, plots, results
def test_torn_last_log_record_is_tolerated(synthetic, tmp_path):
    train(_config(synthetic, tmp_path, max_steps=4, save_every_steps=2, eval_modes=["global"]))
    with open(tmp_path / "train_log.jsonl", "a") as f:
        f.write('{"step": 5, "epoch": 2, "lo')  # power lost while appending
    resumed = train(_config(synthetic, tmp_path, resume="auto", eval_modes=["global"]))
    assert resumed["status"] == "finished" and [r[0] for r in _losses(tmp_path)] == [1, 2, 3, 4, 5, 6]
    (tmp_path / "broken.jsonl").write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(UsageError, match=r"broken.jsonl: line 2"):
        read_jsonl(tmp_path / "broken.jsonl")


def test_missing_matplotlib_skips_the_plot(tmp_path, monkeypatch, caplog):
    from msa.training.run_log import plot_curves

    (tmp_path / "train_log.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert plot_curves(tmp_path, "global") is None
    assert "matplotlib is not installed" in caplog.text and not (tmp_path / "curves.png").exists()


def test_results_are_written_when_the_test_evaluation_fails(synthetic, tmp_path, monkeypatch):
    import msa.training.loop as loop

    evaluate = loop._evaluate

    def failing_on_test(run, model, split):
        if split.split == "test":
            raise OSError("disk gone")
        return evaluate(run, model, split)

    from msa.model import MSAModel

    loaded = []
    from_pretrained = MSAModel.from_pretrained.__func__

    def recording_from_pretrained(cls, directory, **kwargs):
        loaded.append(kwargs)
        return from_pretrained(cls, directory, **kwargs)

    monkeypatch.setattr(loop, "_evaluate", failing_on_test)
    monkeypatch.setattr(MSAModel, "from_pretrained", classmethod(recording_from_pretrained))
    with pytest.raises(OSError, match="disk gone"):
        train(_config(synthetic, tmp_path, epochs=1, eval_modes=["global"]))
    assert loaded == [{"backend": "reference"}]  # the best checkpoint runs with this run's backend
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["test_error"] == "OSError: disk gone" and result["best"]["epoch"] == 1
    assert "test evaluation failed" in (tmp_path / "results.md").read_text()


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.fixture
def broken_images(tmp_path):
    """The synthetic set with one corrupt train image and one corrupt test image (garbage bytes)."""
    data = write_synthetic_dataset(tmp_path / "data", "karpathy", num_images=11)  # 7 / 2 / 2
    for split in ("train", "test"):
        (data.image_root / data.filenames[split][0]).write_bytes(b"not an image")
    return data


def test_skip_bad_checks_every_split_before_training_and_reports_counts(broken_images, tmp_path, capsys):
    code = main(_cli(broken_images, tmp_path / "run", "--epochs", "1", "--eval-modes", "global", "--skip-bad",
                     "--progress", "false"))  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "skipped in train: 1 bad_image, 5 caption_of_bad_image" in out
    assert "skipped in test: 1 bad_image, 5 caption_of_bad_image" in out
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["skipped"]["test"] == {"bad_image": 1, "caption_of_bad_image": 5}
    assert result["test"]["global"]["num_images"] == 1.0  # 2 test images, 1 corrupt
    assert "Skipped in test: 1 bad_image" in (tmp_path / "run" / "results.md").read_text()


def test_a_missing_test_image_stops_the_run_before_the_first_step(synthetic, tmp_path, capsys):
    data = write_synthetic_dataset(tmp_path / "data", "karpathy", num_images=9)
    missing = data.filenames["test"][-1]
    (data.image_root / missing).unlink()
    code = main(_cli(data, tmp_path / "run", "--progress", "false"))
    error = capsys.readouterr().err.strip()
    assert code == 2 and missing in error and len(error.splitlines()) == 1
    assert not (tmp_path / "run" / "train_log.jsonl").exists()


def _one_train_image(folder):
    """An RSITMD-layout set (train and test, no val) with a single train image: too few to carve val out of."""
    data = write_synthetic_dataset(folder, "rsitmd", num_images=4)  # train 2, test 2
    records = json.loads(data.annotations.read_text())
    next(r for r in records["images"] if r["split"] == "train")["split"] = "test"
    data.annotations.write_text(json.dumps(records))
    return data


def test_user_errors_are_one_line_and_exit_2(synthetic, tmp_path, capsys):
    cases = [
        (["--annotations", str(tmp_path / "nope.json")], "nope.json"),
        (["--config", str(tmp_path / "nope.yaml")], "nope.yaml"),
        (["--batch-size", "100"], "fewer than one batch"),
        (["--dataset", "rsicdd"], "unknown dataset"),
    ]
    for extra, expected in cases:
        args = _cli(synthetic, tmp_path / "run", "--progress", "false")
        if extra[0] in args:
            args[args.index(extra[0]) + 1] = extra[1]
        else:
            args += extra
        assert main(args) == 2, extra
        error = capsys.readouterr().err.strip()
        assert expected in error and len(error.splitlines()) == 1 and error.startswith("msa-train: error:"), error
    args = _cli(synthetic, tmp_path / "run", "--debug")
    args[args.index("--batch-size") + 1] = "100"
    with pytest.raises(UsageError, match="fewer than one batch"):
        main(args)
    # Too few train images to carve a val split out of.
    tiny = _one_train_image(tmp_path / "tiny")
    assert main(_cli(tiny, tmp_path / "run2", "--val-fraction", "0.5")) == 2
    assert "too few to carve a val split" in capsys.readouterr().err


def test_msa_eval_user_errors(synthetic, reference_run, tmp_path, capsys):
    from msa.evaluate import main as eval_main

    full_dir, _ = reference_run
    base = ["--dataset", "karpathy", "--annotations", str(synthetic.annotations), "--image-root",
            str(synthetic.image_root), "--backend", "reference"]  # fmt: skip
    for args, expected in (
        (["--checkpoint", str(tmp_path / "missing"), *base], "no model (config.json) found"),
        (["--checkpoint", str(full_dir), *base, "--split", "Test"], "no split 'Test'; splits present"),
    ):
        assert eval_main(args) == 2
        error = capsys.readouterr().err.strip()
        assert expected in error and len(error.splitlines()) == 1 and "Traceback" not in error
    tiny = _one_train_image(tmp_path / "tiny")
    args = ["--checkpoint", str(full_dir), "--dataset", "rsitmd", "--data-root", str(tiny.data_root), "--split", "val"]
    assert eval_main(args) == 2 and "too few to carve" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no model"):
        eval_main(["--checkpoint", str(tmp_path / "missing"), *base, "--debug"])


# ------------------------------------------------------------------------------------------- console output
def test_console_of_a_run_in_a_log_file(synthetic, tmp_path):
    """``python -m msa.train`` with output to a file: val metrics at each evaluation, a tiny carve-out said, epochs
    numbered from 1 as in the logs, and no progress-bar cursor codes."""
    data = write_synthetic_dataset(tmp_path / "data", "rsitmd", num_images=10)  # train 8, test 2, no val
    args = _cli(data, tmp_path / "run", "--val-fraction", "0.25", "--eval-modes", "global", "mscmat")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "msa.train", *args], env=env, capture_output=True, text=True,
                          cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    assert "\r" not in console and "\x1b[" not in console
    assert "2 of 8 train images carved out as val" in console and "too few for a reliable" in console
    for epoch in (1, 2):
        assert f"epoch {epoch}/2 val: global mR" in console and "; mscmat mR" in console
    assert "| global |" in done.stdout


def test_missing_splits_are_said_before_training(tmp_path, caplog):
    data = write_synthetic_dataset(tmp_path, "rsitmd", num_images=10)  # train 8, test 2
    records = json.loads(data.annotations.read_text())
    records["images"] = [r for r in records["images"] if r["split"] == "train"]
    data.annotations.write_text(json.dumps(records))
    config = TrainConfig(dataset="rsitmd", data_root=str(data.data_root), val_fraction=0.0)
    assert list(prepare_splits(config)) == ["train"]
    assert "no val split and val_fraction is 0" in caplog.text and "has no test split" in caplog.text


def test_msa_eval_does_not_import_the_training_application():
    code = "import sys, msa.evaluate; sys.exit('msa.training' in sys.modules or 'msa.train' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# ------------------------------------------------------------------------------------------------ settings
def test_every_shipped_config_parses():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert len(configs) >= 11
    for path in configs:
        config = load_config(path)
        assert config.dataset in ("rsicd", "rsitmd", "ucm", "sydney", "nwpu")
        if "paper" in path.stem:
            # The published hyper-parameters.
            assert (config.lr, config.weight_decay, config.batch_size, config.epochs) == (1e-5, 0.1, 32, 60)
            assert config.lr_schedule == "none" and config.augment == [] and config.preset == "paper"


def test_smoke_config_trains_on_a_small_set(tmp_path):
    """configs/smoke.yaml: the tiny model on a set the size of rs_mini's UCM (9 images, 5 captions each)."""
    data = write_synthetic_dataset(tmp_path / "data", "ucm", num_images=9, captions_per_image=5)
    code = main(["--config", str(REPO / "configs" / "smoke.yaml"), "--data-root", str(data.data_root),
                 "--output-dir", str(tmp_path / "run"), "--backend", "reference", "--progress", "false",
                 "--epochs", "1"])  # fmt: skip
    assert code == 0
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["run"]["model"] == "msa-tiny" and result["status"] == "finished"


def test_cli_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: rsitmd\nlr: 2.0e-5\nepochs: 10\nmodel_overrides: {backend: cpu}\n")
    config = config_from_args(
        ["--config", str(path), "--epochs", "3", "--seeds", "1", "2", "--model-override", "num_heads=4",
         "--augment", "flip", "--skip-bad", "--backend", "reference"]
    )  # fmt: skip
    assert (config.dataset, config.lr, config.epochs, config.seeds) == ("rsitmd", 2e-5, 3, [1, 2])
    assert config.model_overrides == {"backend": "cpu", "num_heads": 4} and config.backend == "reference"
    assert config.augment == ["flip"] and config.skip_bad is True
    with pytest.raises(UsageError, match="unknown training settings"):
        load_config(None, learning_rate=1.0)
    with pytest.raises(UsageError, match="select_mode"):
        TrainConfig(eval_modes=["global"], select_mode="fusion")
    assert TrainConfig(select_mode="mscmat_s2").select_mode == "mscmat_s2"
    path.write_text("lr: [1\n")
    with pytest.raises(UsageError, match="c.yaml is not valid YAML"):
        load_config(path)


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


def test_several_seeds_report_mean_and_std_through_the_cli(synthetic, tmp_path, capsys):
    main(_cli(synthetic, tmp_path, "--epochs", "1", "--seeds", "1", "2", "--eval-modes", "global",
              "--progress", "false"))  # fmt: skip
    assert "| scoring (mean ± std) |" in capsys.readouterr().out
    summary = json.loads((tmp_path / "results.json").read_text())
    values = [summary["seeds"][s]["test"]["global"]["mR"] for s in ("1", "2")]
    mean, std = summary["summary"]["global"]["mR"]
    assert mean == pytest.approx(sum(values) / 2) and std == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    assert all((tmp_path / f"seed_{s}" / "results.md").is_file() for s in (1, 2))
    assert "±" in (tmp_path / "results.md").read_text()


# -------------------------------------------------------------------------------------------- real images
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


@needs_mini
def test_smoke_config_on_real_images(tmp_path):
    code = main(["--config", str(REPO / "configs" / "smoke.yaml"), "--data-root", str(MINI / "ucm"),
                 "--output-dir", str(tmp_path), "--progress", "false", "--epochs", "1"])  # fmt: skip
    assert code == 0 and (tmp_path / "results.md").is_file()
