"""train.py: every mode for one step, exact resume, torch vs chunked convergence, errors."""
import csv
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import trimesh

from mapconnet import checkpoint as ckpt
from mapconnet import files
from mapconnet import training as train
from mapconnet.cli import build_parser, parse_dataclass, split
from mapconnet.data import open_dataset
from mapconnet.losses import LossConfig
from mapconnet.model import MAPConNet, ModelConfig
from mapconnet.objective import TERMS, supervised_losses, weighted_total

TINY = dict(feature_dim=16, encoder_widths=(8, 16), residual_blocks=1, decoder_widths=(16, 8))


def _run(tiny_dataset, out, backend="chunked", **kw):
    kw.setdefault("compile", False)  # compilation costs a minute; test_compiled_step_matches_eager covers it
    cfg = train.TrainConfig(data=str(tiny_dataset), out=str(out), **{"val_every": 100, "val_pairs": 1,
                                                                     "checkpoint_every": 100, **kw})
    return train.main(cfg, ModelConfig(**TINY, backend=backend))


@pytest.mark.parametrize("mode", [dict(), dict(percentage=0, use_unlabelled=True),
                                  dict(percentage=50, use_unlabelled=True)], ids=["supervised", "unsupervised", "semi"])
def test_one_step_per_mode(tiny_dataset, tmp_path, mode):
    steps = 6 if mode.get("percentage") == 50 else 1  # the semi-supervised cycle has 6 kinds of step
    result = _run(tiny_dataset, tmp_path, max_steps=steps, batch_size=1 if steps > 1 else 2, **mode)
    kinds = [row["kind"] for row in result["history"]]
    if not mode:
        assert kinds == ["labelled"]
    elif mode["percentage"] == 0:
        assert kinds == ["unlabelled"]
    else:
        assert kinds[0] == "labelled" and "unlabelled" in kinds and kinds.count("labelled") == 3
    for row in result["history"]:
        assert all(torch.isfinite(torch.tensor(row[k])) for k in ("total", *TERMS))
    for name in ("checkpoint.pt", "losses.csv", "val.csv", "losses.png"):
        assert (tmp_path / name).exists()
    with open(tmp_path / "val.csv") as f:
        val = list(csv.DictReader(f))
    assert [int(r["step"]) for r in val] == [0, steps]  # before training and at the end
    assert all(float(r["pmd"]) > 0 and float(r["pmd_seen"]) > 0 for r in val)


def test_resume_equals_uninterrupted(tiny_dataset, tmp_path):
    """N steps straight = N/2 steps, a checkpoint, --resume, N/2 steps: the same losses bit for bit.
    Three pairs per epoch, so the run crosses into epoch 1 (fresh samples) before and after the break."""
    kw = dict(max_steps=4, batch_size=1, pairs_per_epoch=3)
    straight = _run(tiny_dataset, tmp_path / "a", **kw)["history"]
    first = _run(tiny_dataset, tmp_path / "b", stop_after=2, **kw)["history"]  # "interrupted"
    saved = ckpt.load(tmp_path / "b" / "checkpoint.pt")
    assert {"model", "optimizer", "model_config", "loss_config", "train_config", "step", "epoch", "sampler",
            "rng"} <= set(saved)
    assert saved["step"] == 2 and saved["epoch"] == pytest.approx(2 / 3) and saved["sampler"] == {"labelled": 2}
    assert saved["model_config"] == asdict(ModelConfig(**TINY, backend="chunked"))
    rest = _run(tiny_dataset, tmp_path / "b", resume=True, **kw)["history"]
    assert [r["step"] for r in first + rest] == [0, 1, 2, 3]
    assert [r["total"] for r in first + rest] == [r["total"] for r in straight]
    with open(tmp_path / "b" / "losses.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [0, 1, 2, 3]
    assert train.read_validation(tmp_path / "b") == train.read_validation(tmp_path / "a")  # steps 0 and 4
    # a checkpoint resumes on another kernels backend (a runtime choice, not the architecture)
    more = _run(tiny_dataset, tmp_path / "b", backend="torch", resume=True, max_steps=5, batch_size=1,
                pairs_per_epoch=3)["history"]
    assert [r["step"] for r in more] == [4]


def test_epochs_draw_new_samples(tiny_dataset):
    """Global sample g is item g % length of epoch g // length: later epochs are fresh draws."""
    samples = train.SupervisedPairs(open_dataset(tiny_dataset), [0, 1, 2], [0, 1, 2, 3], 2, seed=0)
    folded = train.Epochs(samples)
    first, again, later = folded[1], folded[1], folded[3]
    assert torch.equal(first["identity_perm"], again["identity_perm"])
    assert not torch.equal(first["identity_perm"], later["identity_perm"])
    samples.set_epoch(1)
    assert torch.equal(samples[1]["identity_perm"], later["identity_perm"])


def test_command_line_names():
    parser = build_parser(train.TrainConfig, ModelConfig, LossConfig)
    args = ("--data D --out O --batch-size 3 --epochs 2 --max-steps 5 --percentage 50 --use-unlabelled "
            "--backend chunked --device cpu --seed 7 --resume --pairs-per-epoch 10 --checkpoint-every 4 "
            "--val-every 2 --val-pairs 1 --workers 1 --no-bf16 --checkpoint-decoder --tau 0.1").split()
    cfg, model_cfg, loss_cfg = split(parser.parse_args(args), train.TrainConfig, ModelConfig, LossConfig)
    assert (cfg.data, cfg.out, cfg.batch_size, cfg.epochs, cfg.max_steps, cfg.percentage) == ("D", "O", 3, 2, 5, 50)
    assert cfg.use_unlabelled and cfg.resume and not cfg.bf16 and (cfg.seed, cfg.workers) == (7, 1)
    assert model_cfg.backend == "chunked" and model_cfg.checkpoint_decoder and loss_cfg.tau == 0.1
    defaults = split(parser.parse_args([]), train.TrainConfig, ModelConfig, LossConfig)
    assert defaults == (train.TrainConfig(), ModelConfig(), LossConfig())  # one place for defaults
    assert parse_dataclass(ModelConfig, ["--decoder-widths", "8", "4"]).decoder_widths == (8, 4)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        split(parser.parse_args(["--backend", "gpu"]), train.TrainConfig, ModelConfig, LossConfig)


def _sphere_batches(steps, dtype=torch.float64):
    """Vertex-aligned training triplets on a 162-vertex sphere randomly stretched per mesh."""
    sphere = trimesh.creation.icosphere(subdivisions=2)
    v = torch.as_tensor(sphere.vertices, dtype=dtype)
    faces = torch.as_tensor(sphere.faces, dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    stretch = lambda: v * (0.5 + torch.rand(3, generator=gen, dtype=dtype))  # noqa: E731
    for _ in range(steps):
        yield {"identity": stretch()[None], "pose": stretch()[None], "target": stretch()[None],
               "identity_faces": faces[None]}


def _curve(backend, steps=20):
    """Losses of `steps` supervised steps of train.py's step function, in float64 so that the only
    difference between backends is rounding (fp32 would let hard-matching flips amplify it)."""
    torch.manual_seed(0)
    model = MAPConNet(ModelConfig(**TINY, backend=backend)).double()
    optimizer = train.make_optimizer(model, lr=1e-4)
    loss_cfg, curve = LossConfig(), []
    for batch in _sphere_batches(steps):
        total = weighted_total(supervised_losses(model, batch, loss_cfg), loss_cfg)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        curve.append(total.item())
    return torch.tensor(curve, dtype=torch.float64)


def test_chunked_and_dense_training_curves_agree():
    dense, chunked = _curve("torch"), _curve("chunked")
    torch.testing.assert_close(chunked, dense, rtol=1e-9, atol=1e-9)
    assert len(set(dense.tolist())) == len(dense)  # the model does change step to step


def test_errors(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="--percentage 0 leaves data unlabelled but --use-unlabelled is off"):
        _run(tiny_dataset, tmp_path, max_steps=1, percentage=0)
    with pytest.raises(ValueError, match=r"--percentage must be in \[0, 100\], got 150"):
        _run(tiny_dataset, tmp_path, max_steps=1, percentage=150, use_unlabelled=True)
    with pytest.raises(ValueError, match="--data .*missing does not exist .* expected a dataset folder"):
        train.main(train.TrainConfig(data=str(tmp_path / "missing"), out=str(tmp_path), max_steps=1))
    with pytest.raises(ValueError, match="--resume needs .*checkpoint.pt, which does not exist"):
        _run(tiny_dataset, tmp_path / "fresh", max_steps=1, resume=True)
    _run(tiny_dataset, tmp_path / "r", max_steps=1)
    with pytest.raises(ValueError, match=r"another model config \(feature_dim: checkpoint 16, given 8\)"):
        train.main(train.TrainConfig(data=str(tiny_dataset), out=str(tmp_path / "r"), max_steps=2, resume=True),
                   ModelConfig(**{**TINY, "feature_dim": 8}))
    with pytest.raises(ValueError, match=r"belongs to a run with other settings \(--lr: checkpoint 0.0001, "
                                         r"given 0.001; --tau: checkpoint 0.07, given 0.1\)"):
        train.main(train.TrainConfig(data=str(tiny_dataset), out=str(tmp_path / "r"), max_steps=2, resume=True,
                                     lr=1e-3, compile=False), ModelConfig(**TINY), LossConfig(tau=0.1))
    forced = train.main(train.TrainConfig(data=str(tiny_dataset), out=str(tmp_path / "r"), max_steps=2, resume=True,
                                          force_resume=True, lr=1e-3, compile=False), ModelConfig(**TINY))
    assert forced["step"] == 2 and forced["history"][0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        ModelConfig(backend="gpu")
    with pytest.raises(ValueError, match="--bf16 autocast is for CUDA"):
        _run(tiny_dataset, tmp_path, max_steps=1, bf16=True)


def test_an_existing_run_is_never_lost(tiny_dataset, tmp_path):
    """A new run into a folder that holds one is refused with its files untouched; --overwrite deletes
    the run's own files and nothing else; a folder another live training holds is refused; a lock
    left by a killed process is taken over."""
    out = tmp_path / "run"
    _run(tiny_dataset, out, max_steps=1)
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match=r"already holds a run \(checkpoint.pt, losses.csv, val.csv, "
                                              r"losses.png\); pass --resume .* --overwrite"):
        _run(tiny_dataset, out, max_steps=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    _run(tiny_dataset, out, max_steps=1, overwrite=True, seed=1)
    assert (out / "notes.txt").read_text() == "mine" and not (out / ".lock").exists()
    assert (out / "checkpoint.pt").read_bytes() != before["checkpoint.pt"]

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / ".lock").write_text("1 training\n")  # process 1 is always alive
    with pytest.raises(FileExistsError, match=r"in use by another training \(process 1"):
        _run(tiny_dataset, busy, max_steps=1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (busy / ".lock").write_text(f"{dead.pid} training\n")  # stale: its process has exited
    _run(tiny_dataset, busy, max_steps=1)
    assert (busy / "checkpoint.pt").is_file() and not (busy / ".lock").exists()


def test_compiled_step_matches_eager(tiny_dataset, tmp_path):
    """--compile (the default) fuses the encoder and decoder; the losses stay those of the eager model
    up to float rounding (the second step's after an update too), and the checkpoint keeps the plain
    parameter names. (Weights are not compared: Adam turns rounding-level gradients of opposite
    sign into full-size steps of opposite sign.)"""
    runs = {flag: _run(tiny_dataset, tmp_path / str(flag), max_steps=2, batch_size=1, compile=flag)
            for flag in (False, True)}
    for eager, compiled in zip(runs[False]["history"], runs[True]["history"]):
        assert compiled["total"] == pytest.approx(eager["total"], rel=1e-4)
    states = [ckpt.load(tmp_path / str(flag) / "checkpoint.pt")["model"] for flag in (False, True)]
    assert list(states[0]) == list(states[1])


def test_validation_rows_and_the_runs_picture(tiny_dataset, tmp_path):
    """val.csv keeps the model's, the warped mesh's and the perfect warp's PMD with the wall-clock,
    and plot_runs draws PMD against hours for several runs."""
    _run(tiny_dataset, tmp_path / "a", max_steps=1)
    rows = train.read_validation_rows(tmp_path / "a")
    assert [int(r["step"]) for r in rows] == [0, 1]
    for row in rows:
        assert float(row["seconds"]) >= 0
        assert float(row["pmd"]) > 0 and float(row["warped_pmd"]) > 0 and float(row["perfect_warp_pmd"]) > 0
    assert rows[0]["pmd"] == rows[0]["warped_pmd"]  # the untrained residual decoder adds nothing
    png = train.plot_runs({"a": tmp_path / "a", "again": tmp_path / "a"}, tmp_path / "runs.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--max-steps", "-5"], "--max-steps must be >= 0, got -5"),
    (["--stop-after", "-3"], "--stop-after must be >= 0, got -3"),
    (["--val-pairs", "-1"], "--val-pairs must be >= 0, got -1"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--residual-blocks", "-1"], "--residual-blocks must be >= 0, got -1"),
    (["--eps", "-1"], "--eps must be a finite number > 0, got -1.0"),
    (["--reconstruction", "-1000"], "--reconstruction must be >= 0, got -1000.0"),
    (["--tau", "0"], "--tau must be a finite number > 0, got 0.0"),
    (["--optimizer", "sgd"], "--optimizer must be one of"),
    (["--warmup-steps", "-2"], "--warmup-steps must be >= 0, got -2"),
    (["--species", "dog"], "--species must be one of ['human', 'quadruped'], got 'dog'"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_every_option_is_checked_when_parsed(argv, message, tmp_path, capsys):
    """A meaningless option is one line `error: ...` and exit status 2, before anything is written."""
    with pytest.raises(SystemExit) as done:
        train.cli(["--out", str(tmp_path / "run"), *argv])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_stream_validates_on_its_own_species(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="holds human bodies but --data stream draws --species quadruped"):
        train.main(train.TrainConfig(data="stream", val_data=str(tiny_dataset), species="quadruped",
                                     out=str(tmp_path / "run"), max_steps=1))
    assert train.TrainConfig(data="stream", val_data="x", species="quadruped").stream_resolution == "smal"
    assert not (tmp_path / "run").exists()


def test_a_folder_run_takes_the_folders_species(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="--species quadruped but --data .* holds human bodies"):
        train.main(train.TrainConfig(data=str(tiny_dataset), species="quadruped", out=str(tmp_path / "run"),
                                     max_steps=1))
    assert not (tmp_path / "run").exists()


def test_a_step_that_cannot_fit_is_refused_before_anything_is_written(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "available_memory", lambda: 2**30)
    with pytest.raises(MemoryError, match=r"--batch-size 64 on 1,723-vertex meshes needs about .* GiB but 1.0 GiB "
                                          r"is available; --batch-size \d fits"):
        _run(tiny_dataset, tmp_path / "big", max_steps=1, batch_size=64)
    assert not list((tmp_path / "big").iterdir())  # not even a log


def test_gradient_clipping_and_its_log(tiny_dataset, tmp_path):
    """losses.csv logs the gradient norm of every step; --grad-clip changes the update (the first
    step's loss is the same, the second's, after a clipped first update, is not)."""
    free = _run(tiny_dataset, tmp_path / "free", max_steps=2, batch_size=1)["history"]
    clipped = _run(tiny_dataset, tmp_path / "clip", max_steps=2, batch_size=1, grad_clip=1e-3)["history"]
    assert all(r["grad_norm"] > 1e-3 for r in free)
    assert free[0]["total"] == pytest.approx(clipped[0]["total"])  # same start
    assert free[1]["total"] != pytest.approx(clipped[1]["total"], rel=1e-6)
    with open(tmp_path / "clip" / "losses.csv") as f:
        assert "grad_norm" in next(csv.reader(f))


def test_the_learning_rate_schedule():
    """Warm-up from lr / warmup to lr, constant to the half, linear decay to 0 at the end."""
    assert [train.lr_at(s, 8, 1.0) for s in range(8)] == [1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    assert [train.lr_at(s, 8, 1.0, warmup=4) for s in range(8)] == [0.25, 0.5, 0.75, 1, 1, 0.75, 0.5, 0.25]


def test_warm_up_is_logged_and_a_run_from_before_it_resumes(tiny_dataset, tmp_path):
    """losses.csv shows the warm-up; a checkpoint written before --warmup-steps existed resumes as
    a run without warm-up (and refuses one that would add it)."""
    rows = _run(tiny_dataset, tmp_path / "warm", max_steps=4, batch_size=1, warmup_steps=2, lr=1e-3)["history"]
    assert [r["lr"] for r in rows] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])
    _run(tiny_dataset, tmp_path / "old", max_steps=4, stop_after=2, batch_size=1)
    path = tmp_path / "old" / "checkpoint.pt"
    payload = ckpt.load(path)
    del payload["train_config"]["warmup_steps"]
    ckpt.save(path, payload)
    with pytest.raises(ValueError, match="--warmup-steps"):
        _run(tiny_dataset, tmp_path / "old", max_steps=4, batch_size=1, resume=True, warmup_steps=2)
    assert _run(tiny_dataset, tmp_path / "old", max_steps=4, batch_size=1, resume=True)["history"][-1]["step"] == 3


def test_a_resumed_log_keeps_its_columns(tmp_path):
    path = tmp_path / "losses.csv"
    path.write_text("step,total\n0,1.5\n")
    files.append_csv_row(path, {"step": 1, "total": 1.25, "grad_norm": 3.0})
    assert path.read_text() == "step,total\n0,1.5\n1,1.25\n"


def test_a_resumed_log_drops_the_rows_after_its_checkpoint(tmp_path):
    path = tmp_path / "val.csv"
    for step in range(4):
        files.append_csv_row(path, {"step": step, "pmd": step / 10})
    files.keep_csv_rows(path, 2)
    assert path.read_text() == "step,pmd\n0,0.0\n1,0.1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["val.csv"]  # the rewrite left no temporary file
    files.keep_csv_rows(path, 0)
    assert not path.exists()  # nothing kept: the next row writes the header again
    files.append_csv_row(path, {"step": 0, "pmd": 0.5})
    assert path.read_text() == "step,pmd\n0,0.5\n"


def test_no_validation_pairs_means_no_validation(tiny_dataset, tmp_path):
    _run(tiny_dataset, tmp_path / "quiet", max_steps=1, val_pairs=0)
    assert (tmp_path / "quiet" / "checkpoint.pt").is_file() and not (tmp_path / "quiet" / "val.csv").exists()


def test_a_backend_that_cannot_run_here_is_refused_up_front(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    if torch.cuda.is_available():
        pytest.skip("triton runs on this machine's GPU")
    train_py = str(Path(__file__).parents[1] / "train.py")
    done = subprocess.run([sys.executable, train_py, "--backend", "triton", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2
    assert done.stderr.startswith("error: --backend triton: backend 'triton' cannot run on cpu")
    assert not (tmp_path / "run").exists()


def test_init_starts_from_the_weights_and_may_grow_the_context_branches(tiny_dataset, tmp_path):
    """--init takes a run's weights (fresh optimiser, step 0): validation at step 0 equals the
    source's final validation, also when --init turns on the decoder's and the encoder's local
    context and the encoder's global context (their branches start silent, the function is the
    same); any other change of architecture is refused by name."""
    source = tmp_path / "source"
    per_vertex = dict(TINY, decoder_neighbours=0, encoder_neighbours=0, encoder_global=False, backend="chunked")
    train.main(train.TrainConfig(data=str(tiny_dataset), out=str(source), max_steps=2, batch_size=1, val_every=100,
                                 val_pairs=1, checkpoint_every=100, compile=False), ModelConfig(**per_vertex))
    final = train.read_validation(source)[-1]
    grow_all = {"decoder_neighbours": 3, "decoder_hops": 2, "encoder_neighbours": 4, "encoder_global": True}
    for name, extra in (("same", {}), ("grown", grow_all)):
        cfg = train.TrainConfig(data=str(tiny_dataset), out=str(tmp_path / name), max_steps=1, batch_size=1,
                                val_every=100, val_pairs=1, checkpoint_every=100, compile=False,
                                init=str(source / "checkpoint.pt"))
        result = train.main(cfg, ModelConfig(**{**per_vertex, **extra}))
        assert result["history"][0]["step"] == 0
        start = train.read_validation(tmp_path / name)[0]
        assert start[0] == 0 and start[1] == pytest.approx(final[1], rel=1e-6)
    grown_config = ckpt.load(tmp_path / "grown" / "checkpoint.pt")["model_config"]
    assert grown_config["decoder_neighbours"] == 3 and grown_config["decoder_hops"] == 2
    assert grown_config["encoder_neighbours"] == 4
    assert grown_config["encoder_global"] is True
    grows = "decoder_neighbours, decoder_hops, encoder_neighbours, encoder_global"
    with pytest.raises(ValueError, match=rf"another model config \(feature_dim: checkpoint 16, given 8\).*--init "
                                         rf"may also turn on {grows}"):
        train.main(train.TrainConfig(data=str(tiny_dataset), out=str(tmp_path / "wider"), max_steps=1,
                                     init=str(source / "checkpoint.pt"), compile=False),
                   ModelConfig(**{**per_vertex, "feature_dim": 8}))
    grown = tmp_path / "grown" / "checkpoint.pt"  # and not the other way: a grown model's branch cannot be dropped
    with pytest.raises(ValueError, match=r"decoder_neighbours: checkpoint 3, given 0"):
        train.main(train.TrainConfig(data=str(tiny_dataset), out=str(tmp_path / "shrunk"), max_steps=1,
                                     init=str(grown), compile=False), ModelConfig(**per_vertex))


def test_the_centred_loss_leaves_the_output_translation_alone(tiny_dataset, tmp_path):
    """No term sees a translation of the output under --centre-output, so the residual decoder's last
    bias (a translation, zero at the start) is not trained: Adam would turn its rounding-noise
    gradient into lr-sized random steps. With the raw reconstruction it trains."""
    for name, centre in (("centred", True), ("raw", False)):
        train.main(train.TrainConfig(data=str(tiny_dataset), out=str(tmp_path / name), max_steps=2, batch_size=1,
                                     val_pairs=0, compile=False), ModelConfig(**TINY, backend="chunked"),
                   LossConfig(centre_output=centre))
    bias = lambda name: ckpt.load(tmp_path / name / "checkpoint.pt")["model"]["decoder.out.bias"]  # noqa: E731
    assert torch.equal(bias("centred"), torch.zeros(3)) and bias("raw").abs().sum() > 0
