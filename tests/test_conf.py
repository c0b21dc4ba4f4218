"""The paper presets (conf/experiment/) and ablation sweeps (sweeps/, the `sweep` group).

Every preset composes at both scales, passes `wetok.config.validate` and holds its appendix
table's values; every sweep expands (with Hydra's own sweeper code) into the jobs it promises,
each of which composes and validates at both scales; the quick scale really shrinks a run.
"""
from __future__ import annotations

import re
from pathlib import Path

import os

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from wetok.config import accumulation_steps, run_id, validate  # also registers ${run_id:}

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SWEEPS = sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml"))
TRAIN_SWEEPS = [s for s in SWEEPS if s != "tab1_memory"]  # tab1_memory names a wetok.memory run
SCALES = ("paper", "quick")
ARCH = re.compile(r"^(table(1[7-9]|2[0-5])|fig5)_c(\d+)_b(\d+)$")  # presets that keep their model
PAPER_SIZE = 256

JOBS = {  # sweep -> number of jobs
    "fig3_quantizer": 3, "fig4_groups": 6, "fig5_architecture": 9,
    "fig5_architecture_tables": 9, "fig6_data_schedule": 4, "tab2_generative_decoder": 2,
    "lfq_exact_d24": 2,
}

# preset -> (quantizer, g, d', C, B, downsample, data, schedule, lr, steps, per-GPU batch,
#            global batch, stage), transcribed from the appendix (Tables 6-28, 32-37)
E = dict(q="gq", g=4, dp=8, C=128, B=4, ds=16, data="imagefolder", sched="constant", lr=1e-4,
         steps=250250, bs=16, gbs=128, stage=1)
GEN = "webdataset"
TABLE = {
    "table06_gfq": dict(E, g=2),
    "table07_lfq": dict(E, q="lfq", g=1, dp=16),
    "table08_bsq": dict(E, q="bsq", g=16, dp=1),
    "table09_gd_stage1": dict(E, C=256, ds=32, data=GEN, steps=550550, bs=6, gbs=1056),
    "table10_gd_stage2": dict(E, C=256, ds=32, data=GEN, steps=550550, bs=6, gbs=1056, stage=2),
    "table11_g1": dict(E, g=1),
    "table13_g4": dict(E, g=4),
    "table16_g32": dict(E, g=32),
    "table17_c128_b4": dict(E),
    "table18_c192_b4": dict(E, C=192, bs=8),
    "table19_c256_b4": dict(E, C=256, bs=4),
    "table20_c128_b8": dict(E, B=8, bs=8),
    "table21_c128_b16": dict(E, B=16, bs=4),
    "table23_c256_b2": dict(E, C=256, B=2, bs=8),
    "table25_c256_b8": dict(E, C=256, B=8, bs=2),
    "table26_imagenet": dict(E, steps=550550),
    "table27_general": dict(E, data=GEN, steps=550550),
    "table28_warmup_cosine": dict(E, data=GEN, sched="warmup_cosine", steps=550550),
    "table32_in1k_16x": dict(E, C=256, steps=400400, bs=8, gbs=1024),
    "table33_in1k_8x": dict(E, C=256, ds=8, steps=350350, bs=8, gbs=1024),
    "table34_768x_stage2b": dict(E, C=256, ds=32, data=GEN, lr=1e-5, steps=330330, bs=6,
                                 gbs=1056, stage=2),
    "table35_192x_stage1": dict(E, C=256, data=GEN, steps=470470, bs=8, gbs=1024),
    "table35_192x_stage1c": dict(E, C=256, data=GEN, lr=1e-6, steps=10010, bs=8, gbs=1024),
    "table36_48x_stage2b": dict(E, C=256, ds=8, data=GEN, lr=1e-6, steps=20020, bs=8, gbs=1024,
                                stage=2),
    "table37_24x_stage1": dict(E, g=8, C=256, ds=8, data=GEN, steps=300300, bs=8, gbs=1024),
    "table37_24x_stage2a": dict(E, g=8, C=256, ds=8, data=GEN, lr=1e-5, steps=50050, bs=8,
                                gbs=1024, stage=2),
    "ext_lfq_exact_d24": dict(E, q="lfq", g=1, dp=24),
    "ext_gq_d24": dict(E, g=3),
}
CHANNEL_MULT = {8: [1, 2, 2, 4], 16: [1, 1, 2, 2, 4], 32: [1, 1, 2, 2, 4, 8]}  # the tables' rows


@pytest.fixture(scope="module", autouse=True)
def hydra_conf(tmp_path_factory):
    # validate() checks that an image folder exists: point data=imagenet at an empty stand-in
    root = tmp_path_factory.mktemp("imagenet")
    (root / "train").mkdir(), (root / "val").mkdir()
    saved = os.environ.get("IMAGENET_ROOT")
    os.environ["IMAGENET_ROOT"] = str(root)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()
    if saved is None:
        os.environ.pop("IMAGENET_ROOT")
    else:
        os.environ["IMAGENET_ROOT"] = saved


_COMPOSED: dict = {}


def load(overrides, config_name="config"):
    """Compose like `python -m wetok.train <overrides>` (cached: read-only in the tests);
    hydra:* interpolations of the returned config resolve as in that job."""
    key = (config_name, *overrides)
    if key not in _COMPOSED:
        _COMPOSED[key] = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    cfg = _COMPOSED[key]
    HydraConfig.instance().set_config(cfg)
    return cfg


def task(cfg) -> dict:
    """The resolved job config without the hydra node (what a run records)."""
    out = OmegaConf.to_container(cfg, resolve=False)
    out.pop("hydra")
    out.pop("run_dir", None)
    return out


def paper_gpus(preset: str) -> int:
    """The H20 GPU count the preset's batch comment states, else that of the preset (or base)
    it is a diff on, its first defaults entry."""
    text = (CONF / "experiment" / f"{preset}.yaml").read_text()
    stated = re.search(r"batch_size: \d+ +# .*?(\d+) H20 GPUs", text)
    if stated:
        return int(stated.group(1))
    return paper_gpus(re.search(r"^defaults:\n  - (\S+)$", text, re.M).group(1))


def sweep_jobs(sweep: str, *cli: str) -> list[list[str]]:
    """The overrides of each job of `python -m wetok.train -m +sweep=<sweep> <cli>`, expanded
    by Hydra's BasicSweeper code (params from the file first, command line after)."""
    params = load([f"+sweep={sweep}", *cli]).hydra.sweeper.params or {}
    args = [f"{k}={v}" for k, v in params.items()] + [f"+sweep={sweep}", *cli]
    parsed = OverridesParser.create().parse_overrides(args)
    (batch,) = BasicSweeper.split_arguments(parsed, None)
    return batch


def job_dir(cfg) -> str:
    """hydra.sweep.dir/hydra.sweep.subdir of a composed job (what Hydra's launcher uses)."""
    return f"{cfg.hydra.sweep.dir}/{cfg.hydra.sweep.subdir}"


# ------------------------------------------------------------------ experiment presets

def test_presets_and_sweeps_exist():
    assert len(PRESETS) >= 40 and set(TABLE) <= set(PRESETS)
    assert set(TRAIN_SWEEPS) == set(JOBS) and "tab1_memory" in SWEEPS
    link = CONF / "sweep"
    assert link.is_symlink() and link.resolve() == (ROOT / "sweeps").resolve()


def test_presets_are_diffs_on_a_shared_setup():
    """A preset builds on a base of experiment/base/ (or the column it continues) and sets no
    model body; the scales never choose /model, so a Fig 5 preset's model survives them."""
    for preset in PRESETS:
        cfg = OmegaConf.load(CONF / "experiment" / f"{preset}.yaml")
        first = cfg.defaults[0]
        assert first.startswith("base/") or first in PRESETS, preset
        assert "model" not in cfg, preset
        assert cfg.get("stage", 2) == 2, preset  # stage 1 is the root's
    for scale in (CONF / "scale").glob("*.yaml"):
        assert "/model:" not in scale.read_text(), scale.name


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_header(preset):
    lines = (CONF / "experiment" / f"{preset}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"  # Hydra reads the header up to the first other line
    assert re.match(r"# (Table \d+|Fig 5|no table)", lines[1]), lines[1]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_validates(preset, scale):
    cfg = load([f"experiment={preset}", f"scale={scale}"])
    assert cfg.name == preset
    assert cfg.hydra.runtime.choices.experiment == preset
    validate(cfg)
    if scale == "paper":
        gpus = paper_gpus(preset)
        validate(cfg, world_size=gpus)
        assert cfg.train.batch_size * gpus == cfg.train.global_batch_size
        assert accumulation_steps(cfg, gpus) == 1
        assert cfg.data.image_size == PAPER_SIZE
        assert cfg.loss.lecam_weight == 0.05 and cfg.loss.perceptual_weight > 0
        assert cfg.train.ema_decay > 0 and list(cfg.optim.betas) == [0.5, 0.9]
        assert cfg.optim.weight_decay == 0


@pytest.mark.parametrize("preset", sorted(TABLE))
def test_preset_holds_table_values(preset):
    t = TABLE[preset]
    cfg = load([f"experiment={preset}", "scale=paper"])  # the preset as the table gives it
    q, m = cfg.quantizer, cfg.model
    assert (q.name, q.groups, q.group_dim) == (t["q"], t["g"], t["dp"])
    assert (m.channels, m.num_res_blocks, m.downsample) == (t["C"], t["B"], t["ds"])
    mult = list(m.channel_mult) if m.channel_mult is not None else CHANNEL_MULT[m.downsample]
    assert mult == CHANNEL_MULT[t["ds"]]
    assert cfg.data.name == t["data"]
    assert cfg.schedule.name == t["sched"]
    warm, end = (10000, 0.01) if t["sched"] == "warmup_cosine" else (0, 1.0)
    assert (cfg.schedule.warmup_steps, cfg.schedule.end_ratio) == (warm, end)
    assert cfg.optim.lr == pytest.approx(t["lr"]) and cfg.optim.disc_lr == pytest.approx(t["lr"])
    assert cfg.train.steps == t["steps"]
    assert (cfg.train.batch_size, cfg.train.global_batch_size) == (t["bs"], t["gbs"])
    assert cfg.stage == t["stage"]
    assert q.entropy_reduction == "mean"  # the official code's scaling over groups (issue 13)
    if q.name == "lfq":
        assert q.entropy_mode == "exact"
    if q.name == "bsq":
        assert q.l2_norm


@pytest.mark.parametrize("preset", ["table06_gfq", "table10_gd_stage2", "table25_c256_b8"])
def test_paper_scale_is_the_preset_alone(preset):
    assert task(load([f"experiment={preset}"])) == task(load([f"experiment={preset}", "scale=paper"]))


@pytest.mark.parametrize("preset", PRESETS)
def test_continuation_presets_point_at_their_previous_run(preset):
    cfg = load([f"experiment={preset}", "scale=paper"])
    if cfg.stage == 1 and cfg.init_from is None:
        return
    m = re.fullmatch(r"runs/(\w+)/([^/]+)/checkpoints/last\.pt", cfg.init_from)
    assert m, cfg.init_from
    prev = m.group(1)
    assert prev in PRESETS and prev != preset
    # the folder that `python -m wetok.train experiment=<prev>` writes
    assert m.group(2) == run_id(f"experiment={prev}")
    assert prev.split("_")[0] == preset.split("_")[0] or (preset, prev) == (
        "table10_gd_stage2", "table09_gd_stage1")
    before = load([f"experiment={prev}", "scale=paper"])
    assert before.stage <= cfg.stage
    assert task(before)["model"] == task(cfg)["model"]
    assert task(before)["quantizer"] == task(cfg)["quantizer"]


@pytest.mark.parametrize("preset", PRESETS)
def test_quick_scale_shrinks(preset):
    paper = load([f"experiment={preset}", "scale=paper"])
    quick = load([f"experiment={preset}", "scale=quick"])
    assert quick.hydra.runtime.choices.scale == "quick"
    assert quick.data.name == "bundled" and paper.data.name != "bundled"
    assert quick.data.image_size < paper.data.image_size
    assert quick.train.steps <= 1000 < paper.train.steps
    assert quick.train.batch_size == 8 and quick.train.global_batch_size is None
    assert quick.train.eval_every <= quick.train.steps
    assert quick.loss.perceptual_weight == 0  # no pretrained weights needed
    # what the table ablates survives: quantizer and stage always, the model for Fig 5
    assert task(quick)["quantizer"] == task(paper)["quantizer"]
    assert quick.stage == paper.stage
    if ARCH.match(preset):
        assert task(quick)["model"] == task(paper)["model"]
    else:
        assert quick.model.name == "small" and quick.model.channels < paper.model.channels


@pytest.mark.parametrize("model", ["c128_b16", "c384_b4", "c256_b4_ds32", "c256_b4_ds8"])
def test_added_model_presets(model):
    cfg = load([f"model={model}", "data=bundled"])
    validate(cfg)
    assert cfg.model.name == model


# ------------------------------------------------------------------ sweeps

@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_header(sweep):
    lines = (ROOT / "sweeps" / f"{sweep}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    if sweep == "tab1_memory":
        assert lines[1].startswith("# NOT a training sweep")
        assert "python -m wetok.memory" in "\n".join(lines[:4])
    else:
        assert lines[1].startswith(f"# python -m wetok.train -m +sweep={sweep}")
        assert any("scale=paper" in line and "hydra/launcher=slurm" in line for line in lines[:5])


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("sweep", TRAIN_SWEEPS)
def test_sweep_jobs_compose_and_validate(sweep, scale):
    cli = [] if scale == "quick" else ["scale=paper"]  # quick is the sweeps' default
    jobs = sweep_jobs(sweep, *cli)
    assert len(jobs) == JOBS[sweep], jobs
    configs = []
    for job in jobs:
        cfg = load(job)
        assert cfg.name == sweep and cfg.sweep == sweep  # run folder runs/<sweep>/, W&B group
        assert cfg.hydra.runtime.choices.scale == scale
        validate(cfg)
        configs.append(task(cfg))
    dirs = {job_dir(load(job)) for job in jobs}
    assert len(dirs) == len(jobs), dirs  # one run folder per job
    if scale == "paper":  # every job is a different run (at quick, fig6's data axis collapses)
        assert len({repr(c) for c in configs}) == len(configs)


def _values(sweep, key, *cli):
    return [OmegaConf.select(load(job), key) for job in sweep_jobs(sweep, *cli)]


def test_fig3_is_the_three_quantizers_at_d16():
    for cli in ([], ["scale=paper"]):
        got = {(c.quantizer.name, c.quantizer.groups, c.quantizer.group_dim)
               for c in map(load, sweep_jobs("fig3_quantizer", *cli))}
        assert got == {("gq", 2, 8), ("lfq", 1, 16), ("bsq", 16, 1)}


def test_fig4_sweeps_the_groups():
    assert _values("fig4_groups", "quantizer.groups") == [1, 2, 4, 8, 16, 32]
    assert set(_values("fig4_groups", "quantizer.group_dim")) == {8}


@pytest.mark.parametrize("sweep,grid", [
    ("fig5_architecture", {(c, b) for c in (128, 192, 256) for b in (2, 4, 8)}),
    ("fig5_architecture_tables", {(128, 4), (128, 8), (128, 16), (192, 4), (192, 8), (256, 2),
                                  (256, 4), (256, 8), (384, 4)}),
])
@pytest.mark.parametrize("scale", SCALES)
def test_fig5_grid_survives_both_scales(sweep, grid, scale):
    cli = [] if scale == "quick" else ["scale=paper"]
    cfgs = [load(job) for job in sweep_jobs(sweep, *cli)]
    assert {(c.model.channels, c.model.num_res_blocks) for c in cfgs} == grid
    if scale == "paper":  # each table's per-GPU batch, one global batch
        assert {c.train.global_batch_size for c in cfgs} == {128}
        by_cell = {(c.model.channels, c.model.num_res_blocks): c.train.batch_size for c in cfgs}
        assert by_cell.get((128, 4)) in (16, None) and by_cell.get((256, 4)) == 4
        assert by_cell.get((256, 8)) == 2
    else:
        assert {c.data.image_size for c in cfgs} == {64} and {c.train.steps for c in cfgs} == {1000}


def test_fig6_crosses_data_and_schedule():
    got = {(c.data.name, c.schedule.name) for c in map(load, sweep_jobs("fig6_data_schedule",
                                                                           "scale=paper"))}
    assert got == {(d, s) for d in ("imagefolder", "webdataset")
                   for s in ("constant", "warmup_cosine")}
    # the (general, warm-up + cosine) job is Table 28
    job = next(j for j in sweep_jobs("fig6_data_schedule", "scale=paper")
               if "experiment=table27_general" in j and "schedule=warmup_cosine" in j)
    t28 = task(load(["experiment=table28_warmup_cosine", "scale=paper"]))
    got = task(load(job))
    for key in ("quantizer", "model", "data", "schedule", "optim", "train", "loss"):
        assert got[key] == t28[key], key


def test_lfq_exact_d24():
    got = [(c.quantizer.name, c.quantizer.groups, c.quantizer.group_dim,
            c.quantizer.entropy_mode) for c in map(load, sweep_jobs("lfq_exact_d24"))]
    assert got == [("lfq", 1, 24, "exact"), ("gq", 3, 8, "grouped")]


@pytest.mark.parametrize("cli", [[], ["scale=paper"], ["scale=paper", "train.steps=7"]])
def test_tab2_stage2_finds_stage1_checkpoint(cli):
    jobs = sweep_jobs("tab2_generative_decoder", *cli)
    first, second = (load(job) for job in jobs)  # the basic launcher runs them in this order
    assert (first.stage, second.stage) == (1, 2)
    s1_dir = job_dir(load(jobs[0]))
    s2 = load(jobs[1])
    assert s2.init_from == f"{s1_dir}/checkpoints/last.pt"
    assert job_dir(s2) != s1_dir and s1_dir.startswith("runs/tab2_generative_decoder/")
    # Table 9's setup at paper scale, quick steps at quick scale, same in both stages
    for c in (first, second):
        assert c.quantizer.groups == 4 and c.quantizer.group_dim == 8
        if "scale=paper" in cli:
            assert (c.model.channels, c.model.downsample, c.data.name) == (256, 32, GEN)
        if not cli:
            assert c.train.steps == 1000 and c.data.name == "bundled"
    # a command-line stage=N runs one stage alone (the two-command form for Slurm)
    for n in (1, 2):
        (only,) = sweep_jobs("tab2_generative_decoder", *cli, f"stage={n}")
        assert load(only).stage == n and job_dir(load(only)) == (s1_dir if n == 1 else job_dir(s2))


def test_tab2_run_folder_keys_extend_the_root_list():
    root = OmegaConf.load(CONF / "config.yaml").hydra.job.config.override_dirname.exclude_keys
    mine = OmegaConf.load(ROOT / "sweeps" / "tab2_generative_decoder.yaml")
    mine = mine.hydra.job.config.override_dirname.exclude_keys
    assert set(root) <= set(mine) and "stage" in mine


def test_tab1_memory_names_the_memory_run():
    cfg = load(["+sweep=tab1_memory"], config_name="memory")
    assert cfg.name == cfg.sweep == "tab1_memory"
    assert list(cfg.dims) == [8, 16, 24, 32, 40] and cfg.group_dim == 8


def test_sweeps_default_to_quick_and_accept_paper():
    for sweep in TRAIN_SWEEPS:
        assert load([f"+sweep={sweep}"]).hydra.runtime.choices.scale == "quick"
        assert load([f"+sweep={sweep}", "scale=paper"]).hydra.runtime.choices.scale == "paper"
