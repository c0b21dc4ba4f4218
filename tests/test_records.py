"""The run-record format (wetok.record_schema): wetok.record_writer writes it and
analysis.record_reader reads it back; records written before summary.json carried
schema_version (version 1) still load."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_records as fx  # noqa: E402

from analysis import record_reader as reader  # noqa: E402
from wetok import record_schema as schema  # noqa: E402
from wetok.record_writer import RecordWriter  # noqa: E402


def tiny_cfg(run_dir: Path):
    return OmegaConf.create({
        "name": "roundtrip", "sweep": "fig4_groups", "stage": 1, "seed": 3,
        "run_dir": str(run_dir), "logger": {"wandb": False},
        "quantizer": {"name": "gq", "groups": 4, "group_dim": 8}, "model": {"name": "tiny"},
        "data": {"name": "bundled", "image_size": 32}, "schedule": {"name": "constant"}})


def test_new_record_round_trips(tmp_path):
    run = tmp_path / "run"
    writer = RecordWriter(run, tiny_cfg(run))
    writer.log(5, "train", {"loss": 0.5, "lr": 1e-4})
    writer.log(10, "val", {"psnr": 21.0, "ssim": 0.6})
    writer.update(status="finished", steps=10, final={"psnr": 21.0, "ssim": 0.6},
                  skipped={"rfid": "no Inception weights"}, counts={"bad_images": 0},
                  baselines={"mean_colour": {"psnr": 15.0, "ssim": 0.3}})
    summary = json.loads((run / schema.SUMMARY_FILE).read_text())
    assert summary["schema_version"] == schema.SCHEMA_VERSION
    assert set(summary) <= set(schema.SUMMARY_FIELDS)
    rows = [json.loads(line) for line in (run / schema.METRICS_FILE).read_text().splitlines()]
    assert [tuple(r)[:3] for r in rows] == [schema.METRICS_ROW_FIELDS] * 2
    assert (run / schema.CONFIG_FILE).is_file()

    row = reader.load_runs(tmp_path).iloc[0]
    assert (row["run"], row["sweep"], row["status"], row["steps"]) == ("run", "fig4_groups",
                                                                       "finished", 10)
    assert row["choice.quantizer"] == "gq" and row["quantizer.groups"] == 4
    assert row["final.psnr"] == 21.0 and row["baseline.mean_colour.psnr"] == 15.0
    assert row["skipped"] == {"rfid": "no Inception weights"} and row["final_from"] == "summary"
    history = reader.load_history(tmp_path)
    assert list(zip(history["split"], history["step"])) == [("train", 5), ("val", 10)]


def test_old_record_without_version_loads_as_version_1(tmp_path):
    fx.write_run(tmp_path / "old", sweep="fig3_quantizer")
    summary = json.loads((tmp_path / "old" / schema.SUMMARY_FILE).read_text())
    assert "schema_version" not in summary and schema.schema_version(summary) == 1
    runs = reader.load_runs(tmp_path)
    assert list(runs["run"]) == ["old"] and runs.loc[0, "status"] == "finished"
    # written before quantizer.codebook_entropy became quantizer.entropy_mode
    assert summary["params"]["quantizer.codebook_entropy"] == "grouped"
    assert runs.loc[0, "quantizer.entropy_mode"] == "grouped"
    assert "quantizer.codebook_entropy" not in runs.columns


def test_newer_record_is_skipped_with_a_warning(tmp_path):
    fx.write_run(tmp_path / "new", sweep="x",
                 extra={"schema_version": schema.SCHEMA_VERSION + 1})
    with pytest.warns(UserWarning, match="newer than this reader"):
        assert reader.load_runs(tmp_path).empty


def test_writer_refuses_an_undeclared_summary_field(tmp_path):
    writer = RecordWriter(tmp_path, tiny_cfg(tmp_path))
    with pytest.raises(ValueError, match="SUMMARY_FIELDS"):
        writer.update(no_such_field=1)
