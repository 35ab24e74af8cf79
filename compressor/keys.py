"""Cache keys, as pure functions of a recipe: what an artifact, a measurement and a timing
depend on, and nothing else.

A stage's key hashes the teacher (and base), the training data, the seed, the format version
and the settings of every stage up to it, so equal prefixes share artifacts and a changed
setting rebuilds from that stage on. A measurement is keyed by its artifact and everything
that changes the figures (eval settings, held-out data, teacher, device); a timing by the set
of models timed together, the latency settings and the machine.
"""

from __future__ import annotations

from . import FORMAT_VERSION
from .data import held_out_of_train
from .storage import digest

# Bumped when what a measurement holds changes: old measurements are re-taken, artifacts kept.
MEASURE_VERSION = 3  # 3: held-out bits per byte
# Bumped when how latency is timed changes (2: decode clocked inside generate): old timings are re-taken.
TIMING_VERSION = 2


def teacher_key(spec) -> str:
    key = {"teacher": spec.teacher.identity(), "format": FORMAT_VERSION}
    if spec.base is not None:
        key["base"] = spec.base.identity()
    return digest(key)


def data_identity(data) -> str:
    """The training blocks as a stage reads them: the text, the held-out share cut from its end
    (when the held-out set comes from it), the block length (a prune's calibration blocks, the
    prompts cut for teacher answers) and the token budget."""
    parts = [data.train.identity(), f"seq{data.seq_len}"]
    if held_out_of_train(data):
        parts.append(f"minus-last{data.heldout_fraction}")
    if data.max_train_tokens:
        parts.append(f"first{data.max_train_tokens}")
    return ":".join(parts)


def stage_keys(recipe, teacher: str, data: str) -> list[str]:
    """key_i = hash(teacher, data, seed, format, settings of stages 0..i)."""
    keys, chain = [], []
    for stage in recipe.stages:
        chain.append(stage.params())
        keys.append(
            digest(
                {"format": FORMAT_VERSION, "teacher": teacher, "data": data, "seed": recipe.spec.seed, "stages": chain}
            )
        )
    return keys


def measurement_key(spec, teacher: str, machine: dict) -> str:
    """Everything but the artifact that a measurement's figures depend on (latency apart)."""
    return digest(
        {
            "eval": spec.eval.model_dump(mode="json", exclude={"latency", "runtimes", "gguf"}),
            "heldout": spec.data.model_dump(mode="json"),
            "teacher": teacher,
            "machine": machine,
            "format": FORMAT_VERSION,
            "measure": MEASURE_VERSION,
            "seed": spec.seed,
        }
    )


def timing_key(latency, machine: dict, artifacts: list[str]) -> str:
    """Models timed together, in interleaved rounds: their set, the settings and the machine."""
    return digest(
        {
            "latency": latency.model_dump(mode="json"),
            "machine": machine,
            "models": sorted(artifacts),
            "timing": TIMING_VERSION,
        }
    )
