"""End-to-end training on the CPU: records, checkpoints, resume, stage 2, bad data, NaN, W&B,
config validation. Tiny model, 32^2 images, a handful of steps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

import wetok.config  # noqa: F401  (run_id resolver)
from wetok import checkpoint
from wetok.config import ConfigError, validate
from wetok.train import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "data.image_size=32", "train.batch_size=2", "train.log_every=1",
        "train.eval_every=1000", "eval.num_images=4", "eval.batch_size=4",
        "eval.metrics=[psnr,ssim]"]


def make_cfg(run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[*TINY, f"run_dir={run_dir}", *overrides])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")
            if r["split"] == "train"}


def test_quick_run_writes_records_and_checkpoint(tmp_path):
    summary = train(make_cfg(tmp_path, "train.steps=3"))
    assert summary["status"] == "finished" and summary["steps"] == 3
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    for key in ("loss", "loss_rec", "loss_gan", "token_entropy", "codebook_entropy", "lr"):
        assert key in rows[0], key
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["final"]["psnr"] > 0 and 0 < on_disk["final"]["usage"] <= 1
    assert on_disk["choices"]["quantizer"] == "gq" and on_disk["params"]["quantizer.groups"] == 4
    assert on_disk["params"]["quantizer.entropy_reduction"] == "mean"
    assert on_disk["counts"]["bad_images"] == 0
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 3 and set(state) >= {"model", "ema", "disc", "opt_g", "opt_d"}


def test_resume_matches_uninterrupted_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(make_cfg(straight, "train.steps=4"))
    train(make_cfg(split, "train.steps=2"))
    train(make_cfg(split, "train.steps=4"))  # same folder: resumes from its step-2 checkpoint
    a, b = train_losses(straight), train_losses(split)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step


def test_finished_run_is_not_trained_again(tmp_path):
    train(make_cfg(tmp_path, "train.steps=2"))
    before = (tmp_path / "metrics.jsonl").read_text()
    summary = train(make_cfg(tmp_path, "train.steps=2"))
    assert summary["status"] == "finished"
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_stage2_starts_from_stage1_output(tmp_path):
    s1 = tmp_path / "s1"
    train(make_cfg(s1, "train.steps=2"))
    ckpt = s1 / "checkpoints" / "last.pt"
    trainer = Trainer(make_cfg(tmp_path / "s2", "stage=2", f"init_from={ckpt}", "train.steps=1"))
    stage1 = Trainer(make_cfg(s1, "train.steps=2"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    trainer.ema.eval(), stage1.ema.eval()
    with torch.no_grad():
        out1, _ = stage1.ema(x)
        out2, _ = trainer.ema(x)  # fresh noise: zero-initialised noise weights ignore it
    torch.testing.assert_close(out2, out1, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in trainer.model.encoder.parameters())
    summary = trainer.fit()
    assert summary["stage"] == 2 and summary["status"] == "finished"


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    data = tmp_path / "images"
    for split in ("train", "val"):
        folder = data / split / "n0001"
        folder.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 36), (40 * i, 90, 200 - 30 * i)).save(folder / f"{i}.png")
        (folder / "broken.JPEG").write_bytes(b"not an image at all")
    run = tmp_path / "run"
    summary = train(make_cfg(run, "data=imagenet", f"data.root={data}", "data.image_size=32",
                             "train.steps=3"))
    assert summary["status"] == "finished"
    assert summary["counts"]["bad_images"] >= 1
    assert any("broken.JPEG" in str(e) for e in summary["bad_image_examples"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, "train.steps=6", "train.ckpt_every=2", "train.log_every=3")
    trainer = Trainer(cfg)
    real_generator = trainer.loss.generator

    def poisoned(*args, **kwargs):
        total, logs = real_generator(*args, **kwargs)
        if trainer.step >= 2:  # the third step goes wrong
            total = total * float("nan")
            logs = {**logs, "loss": total.detach()}
        return total, logs

    monkeypatch.setattr(trainer.loss, "generator", poisoned)
    with pytest.raises(FloatingPointError, match="step 3"):
        trainer.fit()
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "step 3" in summary["error"]


def test_wandb_offline_and_unreachable_server_do_not_stop_training(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_SILENT", "true")
    summary = train(make_cfg(tmp_path / "online", "logger=wandb", "logger.mode=online",
                             "+logger.init_timeout=5", "train.steps=2"))
    assert summary["status"] == "finished"
    summary = train(make_cfg(tmp_path / "offline", "logger=wandb", "logger.mode=offline",
                             "train.steps=2"))
    assert summary["status"] == "finished"
    assert list((tmp_path / "offline" / "wandb").glob("offline-run-*")), "offline run files"
    assert len(train_losses(tmp_path / "offline")) == 2
    import wandb

    wandb.teardown()  # stop this process's W&B service now, not at the test session's exit


@pytest.mark.parametrize("override, key", [
    ("quantizer.dim=20", "quantizer.dim"),
    ("data.image_size=36", "data.image_size"),
    ("stage=2", "init_from"),
    ("quantizer.entropy_mode=magic", "quantizer.entropy_mode"),
    ("quantizer.entropy_reduction=avg", "quantizer.entropy_reduction"),
    ("quantizer.entropy_eps=1e-5 quantizer.entropy_mode=exact", "quantizer.entropy_eps"),
    ("quantizer=lfq quantizer.group_dim=63", "quantizer.group_dim"),
    ("loss.gen_loss=wasserstein", "loss.gen_loss"),
    ("+loss.recon_wieght=2", "loss.recon_wieght"),
    ("train.cpu_threads=0", "train.cpu_threads"),
    ("train.num_workers=-1", "train.num_workers"),
    ("data.name=imagenet21k", "data.name"),
    ("model.channels=48", "model.channels"),
    ("schedule=warmup_cosine", "schedule.warmup_steps"),
    ("train.global_batch_size=3", "train.global_batch_size"),
    ("eval.metrics=[psnr,fvd]", "eval.metrics"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("eval.num_images=-1", "eval.num_images"),
    ("eval.compile_mode=fast", "eval.compile_mode"),
    ("eval.cudnn_benchmark=1", "eval.cudnn_benchmark"),
    ("train.compile_mode=fast", "train.compile_mode"),
    ("train.compile=true +train.compile_options.warp_speed=true", "train.compile_options"),
    ("train.deterministic=yes", "train.deterministic"),
    ("compile_cache_dir=3", "compile_cache_dir"),
])
def test_config_errors_name_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(tmp_path, *override.split()))
    message = str(err.value)
    assert key in message and "expected" in message and "\n" not in message


def test_compile_cache_dir_is_where_torch_compile_caches(tmp_path, monkeypatch):
    """compile_cache_dir (default $WETOK_CACHE/inductor) is the folder Inductor's caches use
    once a Trainer starts, also when importing torch._inductor already wrote Inductor's /tmp
    default into the environment; a TORCHINDUCTOR_CACHE_DIR of the user's wins; null leaves it."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    mine = str(tmp_path / "wetok-cache" / "inductor")  # conftest's WETOK_CACHE
    for env in (None, default_cache_dir()):
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", env or "unset below")  # restored after
        if env is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
        Trainer(make_cfg(tmp_path / "run", "train.steps=1"))
        assert cache_dir() == mine, env
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "users"))
    Trainer(make_cfg(tmp_path / "run", "train.steps=1"))
    assert cache_dir() == str(tmp_path / "users")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    Trainer(make_cfg(tmp_path / "run", "train.steps=1", "compile_cache_dir=null"))
    assert cache_dir() == default_cache_dir()


def test_deterministic_kernels(tmp_path, monkeypatch):
    """train.deterministic: torch's deterministic algorithms (warnings for ops without one) and
    cuBLAS's fixed workspace; off by default."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    Trainer(make_cfg(tmp_path / "a", "train.steps=1"))
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        Trainer(make_cfg(tmp_path / "b", "train.steps=1", "train.deterministic=true"))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)


def test_deprecated_codebook_entropy_key_is_read_as_entropy_mode(tmp_path):
    cfg = make_cfg(tmp_path, "+quantizer.codebook_entropy=exact")
    with pytest.warns(DeprecationWarning) as caught:
        validate(cfg)
    (warning,) = [w for w in caught if "codebook_entropy" in str(w.message)]
    assert str(warning.message) == ("quantizer.codebook_entropy is deprecated: use "
                                    "quantizer.entropy_mode")
    assert cfg.quantizer.entropy_mode == "exact" and "codebook_entropy" not in cfg.quantizer


def test_cli_config_error_is_one_line_and_allocates_nothing(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "wetok.train", "quantizer.group_dim=3", "quantizer.dim=16",
         f"hydra.run.dir={tmp_path}/run"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: config error: quantizer.dim: expected")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_runs_and_prints_composed_presets(tmp_path):
    out = subprocess.run([sys.executable, "-m", "wetok.train", "--cfg", "job",
                          "experiment=table06_gfq"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "groups: 2" in out.stdout and "group_dim: 8" in out.stdout
    out = subprocess.run([sys.executable, "-m", "wetok.train", *TINY, "train.steps=2",
                          f"hydra.run.dir={tmp_path}/cli"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["steps"] == 2


def test_missing_lpips_weights_stop_at_startup_with_the_file_name(tmp_path):
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch_home")}
    out = subprocess.run([sys.executable, "-m", "wetok.train", *TINY, "loss=default",
                          f"hydra.run.dir={tmp_path}/run"], capture_output=True, text=True,
                         cwd=ROOT, env=env)
    assert out.returncode == 2
    last = [line for line in out.stderr.splitlines() if line.strip()][-1]
    assert "vgg16-397923af.pth" in last and str(tmp_path / "torch_home") in last
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_trainer_trains_with_the_loss_it_is_given(tmp_path, torch_home):
    """Trainer(cfg, loss=...) (the benchmark's random-LPIPS loss): taken before anything is set
    up, so the discriminator step uses it too, and no LPIPS weights file is asked for."""
    from wetok.losses import WeTokLoss
    from wetok.weights import MissingWeightsError

    cfg = make_cfg(tmp_path, "loss=default", "logger=none")
    with pytest.raises(MissingWeightsError):
        Trainer(cfg)  # torch_home is empty: the loss cfg.loss builds needs vgg16
    loss = WeTokLoss.from_config(cfg.loss, cfg.quantizer, cfg.weights, random_lpips=True)
    trainer = Trainer(cfg, loss=loss)
    assert trainer.loss is loss and trainer.d_loss.__self__ is loss
    logs = trainer.train_step([torch.rand(2, 3, 32, 32) * 2 - 1])
    assert logs["loss_lpips"] > 0
    assert float(loss.lecam.ema_real) != 0  # D's step updated this loss's LeCam EMA


def test_preemption_on_the_last_step_still_evaluates_after_requeue(tmp_path):
    cfg = make_cfg(tmp_path, "train.steps=2", "train.ckpt_every=1000")
    trainer = Trainer(cfg)
    real_step = trainer.train_step

    def preempted_on_last_step(batches):
        logs = real_step(batches)
        if trainer.step == 2:
            trainer.hook.pending = (None, None)  # as if submitit's USR2 had just arrived
        return logs

    trainer.train_step = preempted_on_last_step
    with pytest.raises(SystemExit):
        trainer.fit()
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["step"] == 2
    summary = train(make_cfg(tmp_path, "train.steps=2", "train.ckpt_every=1000"))  # the requeue
    assert summary["status"] == "finished" and summary["final"]["psnr"] > 0


def test_without_a_gan_term_the_discriminator_is_not_trained(tmp_path):
    """loss.gan_weight=0 (scale=short): D changes nothing in G's update (Eq. 10), so it is
    neither run nor stepped; G's weights equal those of the same steps with D trained."""
    batches = [torch.rand(2, 3, 32, 32) * 2 - 1 for _ in range(2)]
    trainers = {}
    for train_disc in (False, True):
        torch.manual_seed(0)
        t = Trainer(make_cfg(tmp_path / str(train_disc), "loss.gan_weight=0", "logger=none"))
        assert not t.train_disc
        t.train_disc = train_disc
        d0 = {k: v.clone() for k, v in t.disc.state_dict().items()}
        logs = [t.train_step([x]) for x in batches]
        d_same = all(torch.equal(d0[k], v) for k, v in t.disc.state_dict().items())
        assert d_same != train_disc and ("loss_disc" in logs[-1]) == train_disc
        trainers[train_disc] = t
    for (k, a), b in zip(trainers[False].model.state_dict().items(),
                         trainers[True].model.state_dict().values()):
        assert torch.equal(a, b), k
    assert Trainer(make_cfg(tmp_path / "gan", "logger=none")).train_disc  # quick: gan_weight 0.1


def test_compiled_step_matches_eager(tmp_path):
    """train.compile (inductor on the CPU here): the compiled generator, its loss (bool GAN gate,
    GroupNorm from per-channel statistics) and the compiled discriminator step give the eager
    step's losses, without recompiling from one step to the next."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the graphs other tests compiled
    batches = [torch.rand(2, 3, 32, 32) * 2 - 1 for _ in range(3)]
    logs = {}
    for compiled in (False, True):
        trainer = Trainer(make_cfg(tmp_path / str(compiled), f"train.compile={compiled}",
                                   "logger=none"))
        logs[compiled] = [{k: float(v) for k, v in trainer.train_step([x]).items()}
                          for x in batches]
    for i, (eager, comp) in enumerate(zip(logs[False], logs[True])):
        assert eager.keys() == comp.keys()
        rel = 1e-4 if i == 0 else 1e-2  # after an update the tau=0.01 entropies amplify rounding
        for k in eager:
            assert comp[k] == pytest.approx(eager[k], rel=rel, abs=1e-5), (i, k)
    # one graph each for G, its loss, D and its loss: the step number never recompiles them
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4


def test_cpu_threads_and_loader_workers_auto(monkeypatch):
    from wetok import distributed

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert distributed.cpu_threads(None, cuda) == 1  # runs side by side share the cores
    assert distributed.cpu_threads(None, cpu) == torch.get_num_threads()
    assert distributed.cpu_threads(3, cuda) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert distributed.cpu_threads(None, cuda) == torch.get_num_threads()
    assert distributed.loader_workers(None, cuda) == distributed.GPU_LOADER_WORKERS == 2
    assert distributed.loader_workers(None, cpu) == 0 and distributed.loader_workers(1, cpu) == 1
