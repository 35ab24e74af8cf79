"""`compressor export RUN --format NAME`: a stage of a finished run as a folder another program
loads. One module per format, registered here; adding a format is one module and one line.

Shared by every format: which stage (default: the last), that its artifact is intact, that the
output lies outside the run, and that the folder appears whole or not at all (written into a
temporary sibling and renamed), with files readable like any other (0644 under umask 022).
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import UserError
from ..storage import atomic_dir, read_json
from .base import Export, Exporter
from .compressed_tensors import CompressedTensorsExporter
from .gguf import GGUFExporter
from .gptq import GPTQExporter
from .hf import HFExporter

EXPORTERS: dict[str, Exporter] = {
    e.name: e for e in (HFExporter(), GGUFExporter(), CompressedTensorsExporter(), GPTQExporter())
}


def pick_stage(record: dict, name: str | None) -> int:
    """The row of the stage to export (default: the last): its torch row, which holds the artifact
    (a run measured in other runtimes too has a row per runtime)."""
    built = [i for i, s in enumerate(record["stages"]) if s.get("runtime", "torch") == "torch"]
    names = [record["stages"][i]["name"] for i in built]
    if name is None:
        return built[-1]
    if name not in names:
        raise UserError(f"--stage: no stage {name!r} in this run; stages: {', '.join(names)}")
    return built[names.index(name)]


def export(run_dir: Path, out: Path, stage: str | None = None, fmt: str = "hf", **options) -> Path:
    """Write the chosen stage of the run in `run_dir` to `out` in format `fmt`."""
    if fmt not in EXPORTERS:
        raise UserError(f"--format {fmt}: unknown; formats: {', '.join(EXPORTERS)}")
    if not (run_dir / "run.json").is_file():
        raise UserError(f"{run_dir}: no run.json here (run a recipe first)")
    record = read_json(run_dir / "run.json")
    index = pick_stage(record, stage)
    artifact = Path(record["stages"][index]["artifact"])
    if not (artifact / "config.json").is_file():
        raise UserError(
            f"{artifact}: the artifact of stage {record['stages'][index]['name']!r} is gone; rerun the recipe"
        )
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise UserError(f"--out {out}: must be outside the run folder")
    job = Export(record=record, index=index, artifact=artifact, options=options)
    exporter = EXPORTERS[fmt]
    exporter.check(job)
    with atomic_dir(out) as tmp:
        exporter.write(job, tmp)
        _readable(tmp)
    return out


def _readable(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    folder.chmod(0o777 & ~umask)
