"""tools/eval_cli_timing.py: issue 10's command-line timing (the GPU figures come from it)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from eval_cli_timing import split_variant  # noqa: E402


def test_split_variant_sorts_python_arguments_environment_and_overrides():
    assert split_variant("-X importtime -- TORCH_LOGS=recompiles +run.eval.compile=false") == (
        ["-X", "importtime"], {"TORCH_LOGS": "recompiles"}, ["+run.eval.compile=false"])
    assert split_variant("") == ([], {}, [])


def test_times_each_command_and_splits_it(tmp_path):
    """Tiny CPU model: the cache-filling command, the same again and one variant, each row's
    parts (start-up ... exit) within its wall time."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "eval_cli_timing.py"), "--out", str(out),
         "--images", "8", "--variant", "+run.eval.batch_size=8",
         "--overrides", "model=tiny", "data.image_size=32", "eval.batch_size=4",
         "eval.num_workers=0", "train.device=cpu"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [r for r in (out / "eval_cli_timing.md").read_text().splitlines()
            if r.startswith("| ") and not r.startswith("| command |")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| fills the compile cache", "| small, compile cache filled",
        "| small, compile cache filled +run.eval.batch_size=8"]
    for r in rows:
        cells = [float(c) for c in r.strip(" |").split(" | ")[1:]]
        n, wall, parts = cells[0], cells[1], cells[2:-1]
        assert n == 8 and min(parts) >= 0 and 0 < sum(parts) <= wall + 0.2, r
