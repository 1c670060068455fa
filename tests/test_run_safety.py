"""No lost runs: a new run never lands in another run's directory, --resume refuses a changed run, every step is
logged once after a resume, stale temporaries are cleaned, and user errors are one line with exit code 2."""
import json
import os

import pytest

pytest.importorskip("transformers")

import logo.train as train_module  # noqa: E402
from logo.checkpoint import latest_checkpoint  # noqa: E402
from logo.config import parse_config  # noqa: E402

TINY = ["--warmup-copy-steps", "0", "--warmup-sft-steps", "0", "--eval-niah-lengths", "", "--synthetic-train", "8",
        "--synthetic-eval", "2", "--synthetic-context-words", "120", "--window", "1024", "--max-context-tokens",
        "256", "--max-response-tokens", "40", "--tiny-hidden-size", "32", "--tiny-layers", "1",
        "--eval-max-new-tokens", "1", "--no-progress", "--warmup-steps", "2", "--batch-rows", "2"]


def cli(tmp_path, *args, name="run"):
    """main() as the command line runs it: (exit code, stderr)."""
    return train_module.main(TINY + ["--output-dir", str(tmp_path / name), *args])


def rows(run_dir, kind="train"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle if json.loads(line)["kind"] == kind]


def test_a_new_run_into_an_existing_run_directory_is_refused(tmp_path, capsys):
    assert cli(tmp_path, "--max-steps", "2") == 0
    before = open(tmp_path / "run" / "metrics.jsonl").read()
    capsys.readouterr()
    assert cli(tmp_path, "--max-steps", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("logo.train: error: output_dir")
    assert "already holds a run" in err[0] and "--resume" in err[0] and "--overwrite" in err[0]
    assert "Traceback" not in "".join(err)
    assert open(tmp_path / "run" / "metrics.jsonl").read() == before  # untouched


def test_overwrite_starts_over(tmp_path):
    assert cli(tmp_path, "--max-steps", "4", "--save-every", "1") == 0
    assert cli(tmp_path, "--max-steps", "2", "--save-every", "1", "--overwrite") == 0
    run = tmp_path / "run"
    assert [r["step"] for r in rows(run)] == [1, 2]  # the old run's rows are gone
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step-1", "step-2"]
    assert latest_checkpoint(str(run / "checkpoints")).endswith("step-2")


@pytest.mark.parametrize("change", [["--learning-rate", "1e-2"], ["--batch-rows", "1"], ["--seed", "7"],
                                    ["--beta", "3"], ["--num-negatives", "1"], ["--sft-weight", "0.5"]])
def test_resume_refuses_a_change_of_meaning(tmp_path, capsys, change):
    assert cli(tmp_path, "--max-steps", "4", "--stop-after", "2") == 0
    saved = open(tmp_path / "run" / "config.json").read()
    capsys.readouterr()
    assert cli(tmp_path, "--max-steps", "4", "--resume", *change) == 2
    err = capsys.readouterr().err
    field = change[0][2:].replace("-", "_")
    assert "--resume: the configuration differs" in err and f"  {field}: " in err and "Traceback" not in err
    assert open(tmp_path / "run" / "config.json").read() == saved  # not overwritten with unapplied values


def test_resume_accepts_length_logging_and_checkpoint_changes(tmp_path):
    assert cli(tmp_path, "--max-steps", "3", "--stop-after", "2") == 0
    assert cli(tmp_path, "--max-steps", "5", "--resume", "--log-every", "1", "--save-every", "3",
               "--keep-checkpoints", "3", "--eval-max-new-tokens", "2") == 0
    saved = json.load(open(tmp_path / "run" / "config.json"))
    assert (saved["max_steps"], saved["save_every"], saved["eval_max_new_tokens"]) == (5, 3, 2)
    assert [r["step"] for r in rows(tmp_path / "run")] == [1, 2, 3, 4, 5]


def test_after_a_kill_every_step_is_logged_once_and_training_continues_exactly(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert cli(tmp_path, "--max-steps", "6", name="straight") == 0
    real_step = train_module.train_step

    def dies_at_step_5(step, *args, **kwargs):
        if step == 4:  # steps 1-4 logged, last checkpoint at 2
            raise KeyboardInterrupt("killed")
        return real_step(step, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        cli(tmp_path, "--max-steps", "6", "--save-every", "2", name="killed")
    assert [r["step"] for r in rows(tmp_path / "killed")] == [1, 2, 3, 4]
    monkeypatch.setattr(train_module, "train_step", real_step)
    (tmp_path / "killed" / "checkpoints" / ".tmp-step-9").mkdir()  # a torn save
    (tmp_path / "killed" / "config.json.tmp-77").write_text("{")
    assert cli(tmp_path, "--max-steps", "6", "--save-every", "2", "--resume", name="killed") == 0

    killed, straight = rows(tmp_path / "killed"), rows(tmp_path / "straight")
    assert [r["step"] for r in killed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in killed] == pytest.approx([r["loss"] for r in straight], rel=1e-6, abs=1e-7)
    events = EventAccumulator(str(tmp_path / "killed" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert not (tmp_path / "killed" / "checkpoints" / ".tmp-step-9").exists()
    assert not (tmp_path / "killed" / "config.json.tmp-77").exists()


@pytest.mark.parametrize("option, message", [
    (["--max-grad-norm", "-1"], "config field 'max_grad_norm' must be >= 0, got -1.0"),
    (["--sft-weight", "-1"], "config field 'sft_weight' must be >= 0, got -1.0"),
    (["--learning-rate", "nan"], "config field 'learning_rate' must be finite"),
    (["--beta", "0"], "config field 'beta' must be > 0"),
    (["--adam-betas", "0.9,1.5"], "config field 'adam_betas' must be < 1"),
    (["--continuous-ratio", "2"], "config field 'continuous_ratio' must be <= 1"),
    (["--label-smoothing", "0.2", "--loss-type", "hinge"], "'label_smoothing' must be 0 with loss_type 'hinge'"),
    (["--seed", "-3"], "config field 'seed' must be >= 0"),
    (["--tiny-hidden-size", "30", "--tiny-heads", "4"], "must give an even head size"),
    (["--resume", "--overwrite"], "'resume' and 'overwrite' exclude each other"),
    (["--model", "/no/such/model"], "config field 'model': /no/such/model is not an existing directory"),
    (["--deepspeed", "/no/such.json"], "config field 'deepspeed': /no/such.json is not an existing file"),
    (["--config", "/no/such.yaml"], "--config: /no/such.yaml: no such file"),
])
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys, option, message):
    assert cli(tmp_path, *option) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[0].startswith("logo.train: error: ") and message in err[0], err
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "run").exists()  # nothing was written


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert cli(tmp_path, "--max-grad-norm", "-1", "--debug") == 2
    assert "Traceback" in capsys.readouterr().err


def test_yaml_booleans_and_bad_syntax_are_named(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("max_steps: true\n")
    assert cli(tmp_path, "--config", str(config)) == 2
    assert "config field 'max_steps': expected an integer, got True" in capsys.readouterr().err
    config.write_text("beta: [1,\n")
    assert cli(tmp_path, "--config", str(config)) == 2
    assert f"{config}:" in capsys.readouterr().err


def test_non_utf8_training_file_names_its_line(tmp_path, capsys):
    path = tmp_path / "prefs.jsonl"
    good = {"id": "a", "context": "some context", "question": "q?", "chosen": "yes", "rejected": ["no", "maybe"]}
    path.write_bytes((json.dumps(good) + "\n").encode() + b'{"id": "b\xff"}\n')
    assert cli(tmp_path, "--train-file", str(path)) == 2
    assert f"{path}:2: not UTF-8 text" in capsys.readouterr().err


def test_parse_config_refuses_bool_for_numbers_and_nan():
    from logo.errors import ConfigError

    with pytest.raises(ConfigError, match="'max_steps'"):
        parse_config(["--max-steps", "nan"])
    with pytest.raises(ConfigError, match="'window' must be >= 2"):
        parse_config(["--window", "1", "--max-context-tokens", "none"])
    config, _ = parse_config(["--max-steps", "1e3"])
    assert config.max_steps == 1000 and isinstance(config.max_steps, int)
