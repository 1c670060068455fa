"""One run, one writer, with real processes: a live run directory (and a builder / eval output) is locked and a
killed holder never blocks; --resume refuses changed data, tokenizer or model under the same paths; a full disk
or a refused write is one line naming the path and the last complete checkpoint, with nothing temporary left;
SIGTERM checkpoints and --resume continues with the uninterrupted run's losses; a checkpoint cannot run code."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from deepspeed_env import deepspeed_cpu_env

pytest.importorskip("transformers")

import logo.train as train_module  # noqa: E402
from logo.checkpoint import latest_checkpoint  # noqa: E402
from logo.run_lock import holder_pid  # noqa: E402
from tests.test_run_safety import TINY, rows  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def cli(out_dir, *args):
    return train_module.main(TINY + ["--output-dir", str(out_dir), *args])


def start(out_dir, *args, module="logo.train", extra_env=None):
    command = [sys.executable, "-m", module] + (TINY + ["--output-dir", str(out_dir)] if module == "logo.train"
                                                else []) + list(args)
    return subprocess.Popen(command, cwd=ROOT, env=dict(ENV, **(extra_env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout=120, what="the condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def train_rows(run_dir):
    try:
        return rows(run_dir)
    except (OSError, ValueError):
        return []


def no_temporaries(root):
    return [os.path.join(b, n) for b, ds, fs in os.walk(root) for n in ds + fs if ".tmp" in n]


def test_a_second_writer_is_refused_and_a_killed_holder_never_blocks(tmp_path, capsys):
    run = tmp_path / "run"
    holder = start(run, "--max-steps", "100000", "--save-every", "0")
    try:
        wait_for(lambda: holder_pid(str(run)) == holder.pid and train_rows(run), what="the run to train")
        for flags in ([], ["--resume"], ["--overwrite"]):  # in this process: flock refuses a second open file too
            capsys.readouterr()
            assert cli(run, "--max-steps", "3", *flags) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"logo.train: error: output_dir {run} is in use by pid "
                                                       f"{holder.pid} on "), err
            assert "since" in err[0] and "python -m logo.train" in err[0]
        assert holder.poll() is None  # the holder trains on, its directory untouched by the refused runs
        steps = [r["step"] for r in train_rows(run)]
        assert steps == list(range(1, len(steps) + 1))
    finally:
        holder.kill()  # kill -9: no handler runs, the kernel drops the lock
        holder.wait()
    after = subprocess.run([sys.executable, "-m", "logo.train", *TINY, "--output-dir", str(run), "--max-steps", "2",
                            "--resume"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert after.returncode == 0, after.stderr[-2000:]
    assert [r["step"] for r in rows(run)] == [1, 2]  # no checkpoint was left: it started over, logging each step once


def hold_lock(target, inside):
    """A process that holds the lock of ``target`` until killed."""
    code = ("import sys, time; from logo.run_lock import RunLock; "
            f"lock = RunLock(sys.argv[1], 'x', inside={inside}).acquire(); print('held', flush=True); time.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", code, str(target)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_the_builder_and_eval_outputs_are_locked(tmp_path, capsys):
    from logo.data.builder import main as build_main
    from logo.eval.__main__ import main as eval_main
    from tests.tiny_assets import save_tiny_llama_and_preferences

    model_dir, _ = save_tiny_llama_and_preferences(tmp_path)
    capsys.readouterr()
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"id": "a", "context": "x " * 50, "question": "x?"}) + "\n")
    out = tmp_path / "built.jsonl"
    holder = hold_lock(out, inside=False)
    try:
        assert build_main(["build", "--input", str(raw), "--model", model_dir, "--out", str(out),
                           "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--out {out} is in use by pid {holder.pid}" in err[0]
    finally:
        holder.kill()
        holder.wait()
    eval_out = tmp_path / "eval"
    holder = hold_lock(eval_out, inside=False)
    try:
        assert eval_main(["niah", "--model", model_dir, "--out", str(eval_out), "--lengths", "64", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--out {eval_out} is in use by pid {holder.pid}" in err[0]
        assert not eval_out.exists() and not no_temporaries(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert eval_main(["niah", "--model", model_dir, "--out", str(eval_out), "--lengths", "64", "--depths", "0",
                      "--samples", "1", "--values", "2", "--max-new-tokens", "2", "--format", "kv",
                      "--no-progress"]) == 0  # the killed holder does not block


def reversed_preferences(path):
    """Every record's chosen and first rejected swapped: the opposite preferences, under the same path."""
    lines = [json.loads(line) for line in open(path)]
    for record in lines:
        record["chosen"], record["rejected"][0] = record["rejected"][0], record["chosen"]
    with open(path, "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in lines)


@pytest.mark.parametrize("change", ["train_file", "tokenizer", "model", "eval_file"])
def test_resume_refuses_changed_content_under_the_same_paths(tmp_path, capsys, change):
    from tests.tiny_assets import save_tiny_llama_and_preferences

    model_dir, prefs = save_tiny_llama_and_preferences(tmp_path)
    heldout = tmp_path / "heldout.jsonl"
    shutil.copy(prefs, heldout)
    args = ["--model", model_dir, "--train-file", prefs, "--eval-file", str(heldout), "--dtype", "fp32",
            "--max-steps", "4", "--batch-rows", "1"]
    assert cli(tmp_path / "run", *args, "--stop-after", "2") == 0
    if change == "train_file":
        reversed_preferences(prefs)
    elif change == "eval_file":
        reversed_preferences(heldout)
    elif change == "tokenizer":
        config = json.load(open(os.path.join(model_dir, "tokenizer_config.json")))
        config["model_max_length"] = 77
        json.dump(config, open(os.path.join(model_dir, "tokenizer_config.json"), "w"))
    else:
        import transformers

        transformers.AutoModelForCausalLM.from_pretrained(model_dir).apply(  # other weights, same shapes
            lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None).save_pretrained(model_dir)
    capsys.readouterr()
    assert cli(tmp_path / "run", *args, "--resume") == 2
    err = capsys.readouterr().err
    assert "changed under the same paths" in err and "Traceback" not in err
    expected = {"train_file": "train_file: content changed", "eval_file": "eval_file: content changed",
                "tokenizer": "tokenizer: tokenizer_config.json changed", "model": "model: model.safetensors changed"}
    assert expected[change] in err, err
    if change == "eval_file":  # the same data under a new path is a declared change: accepted
        moved = tmp_path / "heldout2.jsonl"
        shutil.copy(heldout, moved)
        assert cli(tmp_path / "run", *[a if a != str(heldout) else str(moved) for a in args], "--resume") == 0


def test_a_crafted_trainer_state_that_would_run_code_is_refused(tmp_path, capsys):
    assert cli(tmp_path / "run", "--max-steps", "3", "--stop-after", "1") == 0
    marker = tmp_path / "pwned"
    crafted = ("import torch, sys\nclass Payload:\n    def __reduce__(self):\n"
               f"        return (open, ({str(marker)!r}, 'w'))\n"
               "torch.save({'step': 1, 'x': Payload()}, sys.argv[1])\n")
    state = os.path.join(latest_checkpoint(str(tmp_path / "run" / "checkpoints")), "trainer.pt")
    subprocess.run([sys.executable, "-c", crafted, state], check=True, env=ENV)
    capsys.readouterr()
    assert cli(tmp_path / "run", "--max-steps", "3", "--resume") == 2
    err = capsys.readouterr().err
    assert "trainer.pt: refused" in err and "could run code" in err and "Traceback" not in err
    assert not marker.exists()


def can_mount_tmpfs(path):
    try:
        return subprocess.run(["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {path}"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """A real full file system where the machine allows a tmpfs in a user namespace, else ENOSPC injected."""
    args = ["--max-steps", "6", "--save-every", "1", "--keep-checkpoints", "1"]
    assert cli(tmp_path / "sizing", *args[:1], "1", *args[2:]) == 0  # measures one checkpoint and the rest
    sizing = tmp_path / "sizing"
    checkpoint = sum(f.stat().st_size for f in (sizing / "checkpoints" / "step-1").iterdir())
    rest = sum(f.stat().st_size for f in sizing.rglob("*") if f.is_file()) - checkpoint
    rest -= sum(f.stat().st_size for f in (sizing / "final").rglob("*") if f.is_file())
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.environ.get("LOGO_TEST_INJECT_ENOSPC") != "1" and can_mount_tmpfs(mount):  # room for the run and one checkpoint and a half: the second one cannot be written
        size_kib = int((rest + 1.5 * checkpoint) / 1024) + 64
        command = (f"mount -t tmpfs -o size={size_kib}k tmpfs {mount} && {sys.executable} -m logo.train "
                   + " ".join(f"'{a}'" for a in TINY + ["--output-dir", str(mount / "run"), *args])
                   + f"; echo exit=$?; cp -a {mount}/run {tmp_path}/copy")
        result = subprocess.run(["unshare", "-Urm", "sh", "-c", command], cwd=ROOT, env=ENV, capture_output=True,
                                text=True, timeout=300)
        code = int(result.stdout.strip().splitlines()[-1].split("=")[1])
        err, run = result.stderr.strip().splitlines(), tmp_path / "copy"
        shown = str(mount / "run")
    else:
        import logo.checkpoint as checkpoint_module

        real, calls = checkpoint_module.save_tensors_file, {"n": 0}

        def fills_up(obj, path):
            calls["n"] += 1
            if calls["n"] == 2:
                open(path, "wb").write(b"partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            return real(obj, path)

        monkeypatch.setattr(checkpoint_module, "save_tensors_file", fills_up)
        import io
        from contextlib import redirect_stderr

        buffer = io.StringIO()
        with redirect_stderr(buffer):
            code = cli(tmp_path / "run", *args)
        err, run, shown = buffer.getvalue().strip().splitlines(), tmp_path / "run", str(tmp_path / "run")
    assert code == 4, err
    assert err[-1].startswith(f"logo.train: error: cannot write {shown}/checkpoints/.tmp-step-2"), err
    assert "No space left on device" in err[-1] and "the last complete checkpoint is step-1" in err[-1]
    assert "--resume" in err[-1] and not any("Traceback" in line for line in err)
    assert latest_checkpoint(str(run / "checkpoints")).endswith("step-1")
    assert no_temporaries(run) == []


@pytest.mark.parametrize("where", ["metrics", "export", "results"])
def test_a_refused_write_of_metrics_export_or_results_is_one_line(tmp_path, capsys, monkeypatch, where):
    """ENOSPC / EACCES injected at the write (the OS call the real failure would come from)."""
    import builtins

    real_open, real_replace = builtins.open, os.replace
    target = {"metrics": "metrics.jsonl", "export": "final.tmp", "results": "results.json.tmp-"}[where]
    number = errno.EACCES if where == "export" else errno.ENOSPC

    def refusing(path, *a, **k):
        if target in str(path) and (where != "metrics" or "a" in (a[0] if a else k.get("mode", "r"))) \
                and rows_written(tmp_path) >= 2:
            raise OSError(number, os.strerror(number), str(path))
        return real_open(path, *a, **k)

    def rows_written(root):
        path = root / "run" / "metrics.jsonl"
        return sum(1 for _ in real_open(path)) if path.exists() else 0

    def refusing_replace(src, dst, *a, **k):
        if where == "export" and str(src).endswith("final.tmp"):
            raise OSError(number, os.strerror(number), str(dst))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(builtins, "open", refusing)
    monkeypatch.setattr(os, "replace", refusing_replace)
    code = cli(tmp_path / "run", "--max-steps", "3", "--save-every", "1")
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and err[-1].startswith("logo.train: error: cannot write "), err
    assert os.strerror(number) in err[-1] and "the last complete checkpoint is step-" in err[-1]
    assert target.rstrip("-") in err[-1] or "final" in err[-1]
    assert no_temporaries(tmp_path / "run") == []
    assert latest_checkpoint(str(tmp_path / "run" / "checkpoints")) is not None


def test_sigterm_checkpoints_and_resume_gives_the_uninterrupted_losses(tmp_path):
    assert cli(tmp_path / "straight", "--max-steps", "40", "--save-every", "0") == 0
    run = tmp_path / "run"
    process = start(run, "--max-steps", "40", "--save-every", "0")
    wait_for(lambda: train_rows(run), what="the first step")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 75, err[-2000:]
    stopped = len(train_rows(run))
    assert 1 <= stopped < 40
    assert "SIGTERM received: stopping after the current optimizer step" in err
    assert f"stopped after step {stopped} of 40 (SIGTERM; checkpoint step-{stopped} written); continue with " \
           f"--resume --output-dir {run}" in err
    assert latest_checkpoint(str(run / "checkpoints")).endswith(f"step-{stopped}")
    assert cli(run, "--max-steps", "40", "--save-every", "0", "--resume") == 0
    assert [r["step"] for r in rows(run)] == list(range(1, 41))
    assert [r["loss"] for r in rows(run)] == pytest.approx([r["loss"] for r in rows(tmp_path / "straight")],
                                                         rel=1e-6, abs=1e-7)


def test_a_second_signal_exits_at_once(tmp_path):
    run = tmp_path / "run"
    process = start(run, "--max-steps", "100000", "--save-every", "0", "--tiny-hidden-size", "512", "--tiny-layers",
                    "4")  # steps and checkpoints long enough for the second signal to land first
    wait_for(lambda: train_rows(run), what="the first step")
    process.send_signal(signal.SIGINT)
    wait_for(lambda: _said(process), timeout=60, what="the first signal's notice")
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, err[-2000:]
    assert "second signal (SIGINT): exiting now, without a checkpoint" in err


def _said(process):
    """Whether the process has reacted to the first signal (a notice on stderr): read without blocking."""
    import select

    ready, _, _ = select.select([process.stderr], [], [], 0)
    if ready:
        line = process.stderr.readline()
        _said.lines = getattr(_said, "lines", []) + [line]
        return "received" in line
    return False


def worker_of_rank(launcher_pid, rank):
    """The pid of the torchrun worker with RANK=rank."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = open(f"/proc/{entry}/status").read()
            environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        parent = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), None)
        if parent == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(entry)
    return None


@pytest.mark.skipif(not shutil.which("torchrun", path=os.path.dirname(sys.executable)), reason="needs torchrun")
def test_under_deepspeed_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    pytest.importorskip("deepspeed")
    env = deepspeed_cpu_env(ENV)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    args = TINY + ["--max-steps", "30", "--save-every", "0", "--batch-rows", "1", "--deepspeed", "configs/zero2.json"]
    command = [torchrun, "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000), "-m",
               "logo.train"]

    def launch(run, *extra):
        return subprocess.Popen(command + args + ["--output-dir", str(run), *extra], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    run = tmp_path / "ds"
    launcher = launch(run)
    wait_for(lambda: train_rows(run), timeout=300, what="the first DeepSpeed step")
    rank1 = worker_of_rank(launcher.pid, 1)
    assert rank1 is not None
    os.kill(rank1, signal.SIGTERM)  # rank 1 only
    out, err = launcher.communicate(timeout=300)
    stopped = len(train_rows(run))
    assert 1 <= stopped < 30, err[-3000:]
    assert "SIGTERM received" in err
    assert f"stopped after step {stopped} of 30 (a signal on another rank; checkpoint step-{stopped} written)" in err
    engine = run / "checkpoints" / f"step-{stopped}" / "engine"
    assert sorted(p.name for p in engine.iterdir() if "optim" in p.name) == [  # both ranks saved the same step
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    resumed = launch(run, "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert cli(tmp_path / "single", "--max-steps", "30", "--save-every", "0", "--batch-rows", "2") == 0
    assert [r["step"] for r in rows(run)] == list(range(1, 31))
    assert [r["loss"] for r in rows(run)] == pytest.approx([r["loss"] for r in rows(tmp_path / "single")], rel=1e-5)


def test_the_builder_refuses_a_changed_record_and_names_what_is_safe_when_a_write_fails(tmp_path, monkeypatch):
    from logo.data import records as records_module
    from logo.data.builder import BuildOptions, build
    from logo.data.tokenizer import default_tokenizer
    from logo.errors import RunDirectoryError, StorageError
    from tests.test_builder import echo_generate, raw_lines, read_raw_file_from

    tokenizer, out = default_tokenizer(), tmp_path / "o.jsonl"
    options = BuildOptions(chunk_tokens=64, max_critical=2, scorer="words", batch_size=1)
    raw = read_raw_file_from(tmp_path, raw_lines()[:2])
    build(raw[:1], tokenizer, echo_generate, str(out), options, progress=False)
    grown = read_raw_file_from(tmp_path, raw_lines()[:2] + [dict(raw_lines()[0], id="z")])
    counts = build(grown, tokenizer, echo_generate, str(out), options, progress=False)  # new records: built
    assert counts["already_built"] == 1
    edited = read_raw_file_from(tmp_path, [dict(raw_lines()[0], question="Who wrote the other letter?")] +
                                raw_lines()[1:2])
    with pytest.raises(RunDirectoryError, match="input record\\(s\\) changed since they were built: a"):
        build(edited, tokenizer, echo_generate, str(out), options, progress=False)
    with pytest.raises(RunDirectoryError, match="--chunk-tokens: 64 -> 32"):
        build(grown, tokenizer, echo_generate, str(out), BuildOptions(chunk_tokens=32, max_critical=2,
                                                                          scorer="words"), progress=False)
    before = out.read_text()

    real_write = records_module.write_preference_file

    def full(records, path):
        if path != str(out):
            return real_write(records, path)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(records_module, "write_preference_file", full)
    more = read_raw_file_from(tmp_path, raw_lines()[:2] + [dict(raw_lines()[0], id="z"), dict(raw_lines()[0],
                                                                                                id="y")])
    with pytest.raises(StorageError) as failure:
        build(more, tokenizer, echo_generate, str(out), options, progress=False)
    message = str(failure.value)
    assert message.startswith(f"cannot write {out}: No space left on device")
    assert "record(s) built so far are safe in" in message and "rerun the same command to resume" in message
    assert out.read_text() == before and (tmp_path / "o.jsonl.partial").exists()


def test_an_eval_output_that_cannot_be_written_leaves_nothing_half_written(tmp_path, capsys, monkeypatch):
    from logo.eval.__main__ import main as eval_main
    from tests.tiny_assets import save_tiny_llama_and_preferences

    model_dir, _ = save_tiny_llama_and_preferences(tmp_path)

    from matplotlib.figure import Figure

    def full(self, path, *args, **kwargs):  # the OS refusing the write inside matplotlib
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(Figure, "savefig", full)
    capsys.readouterr()
    assert eval_main(["niah", "--model", model_dir, "--out", str(tmp_path / "eval"), "--lengths", "64", "--depths",
                      "0", "--samples", "1", "--values", "2", "--max-new-tokens", "2", "--format", "kv",
                      "--no-progress"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("logo.eval: error: cannot write ") and "niah.png: No space left on device" in err[-1]
    assert "nothing was written to --out" in err[-1]
    assert not (tmp_path / "eval").exists() and not no_temporaries(tmp_path)


def test_fingerprints_catch_an_edited_byte_and_sampled_weights_catch_other_weights(tmp_path):
    from logo.fingerprint import differences, file_fingerprint

    data = tmp_path / "prefs.jsonl"
    data.write_bytes(b'{"chosen": "a"}\n' * 100000)
    before = file_fingerprint(str(data))
    edited = bytearray(data.read_bytes())
    edited[len(edited) // 2 + 3] ^= 1  # one bit in the middle of the file
    data.write_bytes(bytes(edited))
    after = file_fingerprint(str(data))
    assert before["scheme"] == "full" and before["size"] == after["size"] and before != after
    assert differences({"train_file": before}, {"train_file": after})[0].startswith("train_file: content changed")
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(os.urandom(8 << 20))
    sampled = file_fingerprint(str(shard), sampled_above=1 << 20)
    assert sampled["scheme"] == "sampled-256"
    shard.write_bytes(os.urandom(8 << 20))  # other weights, same size
    assert file_fingerprint(str(shard), sampled_above=1 << 20) != sampled
