"""Golden equivalence: every experiment, run on small fixed inputs, reproduces the rows, values and
tables recorded in tests/golden/ (float tolerance), on whichever supported transformers is installed.

The records were made with code that predates the hook core, on transformers 5.17, where that code
was correct; they guard refactors of the engine and runner and the transformers range at once.
Rerecord (only after a change that is meant to change numbers, naming the records and why in the
commit):

    python tests/test_golden.py tests/golden [name ...]      # default: every record

Rerecorded since: head_ablation-demo_llava (random head sets nested across k), knockout-demo_llava
(random keys from the image area), cma-demo_llava (source IoU column, dropped-pairs line; median and
pooled MF columns), head_ablation-demo_llava (median and pooled MF columns; head means by position
role, generated tokens taking the text positions' mean), and every demo_llava record (the demo models'
third training stage, which adds the list prompt: classification.mode=list is now their default);
token_ablation-demo_llava gained ig_completeness.parquet (IG's completeness per target, a new
output; its results.parquet is the earlier record, unchanged).
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import compose_cfg  # noqa: E402
from vlmloc import app  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"
SYN = ("data=synthetic", "data.synthetic.n_images=6")
# name -> overrides; {run:<name>} is replaced by that run's directory. In dependency order.
RUNS: dict[str, tuple[str, ...]] = {
    "baseline-demo_llava": ("experiment=baseline", "model=demo_llava", *SYN, "data.n=6"),
    "token_ablation-demo_llava": ("experiment=token_ablation", "model=demo_llava", *SYN, "data.n=3",
                                  "experiment.integrated_gradients.steps=4", "mean_embedding.n_images=4"),
    "shuffle-demo_llava": ("experiment=shuffle", "model=demo_llava", *SYN, "data.n=4"),
    "extension-demo_llava": ("experiment=extension", "model=demo_llava", *SYN, "data.n=4", "experiment.n_examples=1"),
    "knockout-demo_llava": ("experiment=knockout", "model=demo_llava", *SYN, "data.n=3"),
    "make_pairs-demo_llava": ("experiment=make_pairs", "model=demo_llava", "inpaint=oracle", *SYN, "data.n=6",
                              "experiment.figure_examples=1"),
    "cma-demo_llava": ("experiment=cma", "model=demo_llava", "data=pairs", "data.pairs_dir={run:make_pairs-demo_llava}",
                       "data.n=2"),
    "head_ablation-demo_llava": ("experiment=head_ablation", "model=demo_llava", *SYN, "data.n=3",
                                 "experiment.cma_dir={run:cma-demo_llava}", "experiment.ks=[1,4,all]",
                                 "experiment.mean_samples=4"),
    "baseline-tiny_internvl": ("experiment=baseline", "model=tiny_internvl", *SYN, "data.n=3",
                               "model.localization.max_new_tokens=8"),
    "knockout-tiny_internvl": ("experiment=knockout", "model=tiny_internvl", *SYN, "data.n=2",
                               "model.localization.max_new_tokens=6"),
    "view_ablation-tiny_internvl": ("experiment=view_ablation", "model=tiny_internvl", *SYN, "data.n=3",
                                    "data.synthetic.width=[480,520]", "data.synthetic.height=[240,250]",
                                    "model.localization.max_new_tokens=6", "mean_embedding.n_images=4"),
    "position_probe-tiny_llava": ("experiment=position_probe", "model=tiny_llava", *SYN, "data.n=null"),
}


def _needs(name: str) -> list[str]:
    """The runs `name` reads ({run:<name>} in its overrides)."""
    return [m for o in RUNS[name] for m in re.findall(r"\{run:([^}]+)\}", o)]


def run_one(out: Path, name: str) -> Path:
    """Run `name` into out/<name>/ (data and caches under out/); the runs it needs must be there."""
    resolved = [re.sub(r"\{run:([^}]+)\}", lambda m: str(out / m.group(1)), o) for o in RUNS[name]]
    cfg = compose_cfg(*resolved, f"paths.cache_dir={out / 'cache'}", data_dir=out / "data")
    app.run(cfg, out / name)
    return out / name


def _tables(run_dir: Path) -> dict[str, str]:
    """Every markdown table of a run, the folder of all runs written as <out> (it differs per machine)."""
    return {p.name: p.read_text().replace(str(run_dir.parent), "<out>") for p in sorted(run_dir.glob("*.md"))}


def _frames(run_dir: Path) -> dict[str, pd.DataFrame]:
    """Every parquet file of a run, with what differs per machine written out of its text columns: the
    folder of all runs as <out>, config hashes (`name@<12 hex>`, they cover install paths) as @<hash>."""

    def portable(x: object) -> object:
        return re.sub(r"@[0-9a-f]{12}$", "@<hash>", x.replace(str(run_dir.parent), "<out>")) if isinstance(x, str) else x

    frames = {}
    for p in sorted(run_dir.glob("*.parquet")):
        df = pd.read_parquet(p)
        for col in df.columns:
            if df[col].map(lambda x: isinstance(x, str)).any():
                df[col] = df[col].map(portable)
        frames[p.name] = df
    return frames


# Columns that identify a row in the project's parquet files (results, mf, manifest, probes).
ROW_KEYS = ("sample_id", "task", "condition", "layer", "head", "positions", "stage", "target", "view", "row", "col")


def assert_frames_match(got: pd.DataFrame, want: pd.DataFrame, where: str) -> None:
    """Same columns and rows (in key order: row order in a file depends on batching and resumes);
    floats within 1e-4 (absolute) or 1e-3 (relative), the rest exact."""
    assert list(got.columns) == list(want.columns), where
    assert len(got) == len(want), where
    keys = [c for c in ROW_KEYS if c in want.columns]
    if keys:
        got = got.sort_values(keys, kind="stable").reset_index(drop=True)
        want = want.sort_values(keys, kind="stable").reset_index(drop=True)
    for col in want.columns:
        g, w = got[col].to_numpy(), want[col].to_numpy()
        if want[col].dtype.kind == "f":
            np.testing.assert_allclose(g.astype(float), w.astype(float), atol=1e-4, rtol=1e-3, equal_nan=True,
                                       err_msg=f"{where}: column {col}")
        else:
            assert [str(x) for x in g] == [str(x) for x in w], f"{where}: column {col}"


class _Reruns:
    """Each run once, on first use, after the runs it needs."""

    def __init__(self, out: Path) -> None:
        self.out, self.done = out, {}

    def get(self, name: str) -> Path:
        if name not in self.done:
            for need in _needs(name):
                self.get(need)
            self.done[name] = run_one(self.out, name)
        return self.done[name]


@pytest.fixture(scope="module")
def reruns(tmp_path_factory) -> _Reruns:
    if not GOLDEN.is_dir():
        pytest.fail(f"{GOLDEN} is missing: the golden records are part of the repository")
    return _Reruns(tmp_path_factory.mktemp("golden"))


@pytest.mark.parametrize("name", list(RUNS))
def test_experiment_reproduces_its_golden_record(name, reruns):
    want_dir, got_dir = GOLDEN / name, reruns.get(name)
    want = _frames(want_dir)
    assert want, f"no golden parquet for {name}"
    got = _frames(got_dir)
    assert sorted(got) == sorted(want), name
    for file, frame in want.items():
        assert_frames_match(got[file], frame, f"{name}/{file}")
    assert _tables(got_dir) == {p.name: p.read_text() for p in sorted(want_dir.glob("*.md"))}


def record(out: Path, names: list[str] | None = None) -> None:
    """Write the golden records of `names` (default: all): each run's parquet files and markdown
    tables, nothing else. The runs they need are run too, not written."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        runs = _Reruns(Path(tmp))
        for name in names or list(RUNS):
            run_dir = runs.get(name)
            dest = out / name
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            for file, frame in _frames(run_dir).items():
                frame.to_parquet(dest / file)
            for file, text in _tables(run_dir).items():
                (dest / file).write_text(text)


if __name__ == "__main__":
    record(Path(sys.argv[1]), sys.argv[2:] or None)


# Experiments whose numbers are other runs' (no golden record of their own), each run end to end
# by its own test file: suite and paper (paper_smoke its CI-sized preset) run other experiments;
# report rebuilds the report from finished runs and checks its numbers against their parquet.
RUN_ELSEWHERE = {"suite": "test_suite.py", "report": "test_report.py", "paper": "test_paper.py",
                 "paper_smoke": "test_paper.py"}


def test_every_experiment_config_is_run_end_to_end():
    """A new file under configs/experiment/ cannot ship unrun: each has a golden record here, or is
    one of RUN_ELSEWHERE, whose test file runs it through `app.run`."""
    from vlmloc.__main__ import config_dir

    for name, file in RUN_ELSEWHERE.items():
        text = (Path(__file__).parent / file).read_text()
        assert "app.run(" in text and (name in ("suite", "paper") or f"experiment={name}" in text), f"{file} does not run {name}"
    configs = {p.stem for p in (config_dir() / "experiment").glob("*.yaml")} - set(RUN_ELSEWHERE)
    run_here = {o.split("=", 1)[1] for overrides in RUNS.values() for o in overrides if o.startswith("experiment=")}
    assert configs == run_here, f"experiment configs without a golden run: {sorted(configs - run_here)}"
