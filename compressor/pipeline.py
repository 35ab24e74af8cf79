"""plan -> run stages -> measure -> record, with a content-addressed cache.

A stage's key hashes the teacher, the training data, the seed, the format version and the
params of every stage up to it. Equal prefixes share artifacts (so orderings that start alike
run their common stages once), a rerun reuses every finished stage, a killed stage resumes
from its last checkpoint, and a corrupt artifact (hash mismatch) is rebuilt. Every artifact
is measured the same way, from what is on disk; measurements are cached by artifact, eval
settings and machine.
"""

from __future__ import annotations

import copy
import os
import platform
import time
from functools import cached_property
from importlib import metadata
from pathlib import Path

import torch

from . import FORMAT_VERSION, __version__
from .answers import Endpoint
from .data import TextSource, load_documents, pack, split_heldout
from .measure import EvalSpec, measure
from .models import Loaded, load_pretrained, load_teacher, resolve_device
from .progress import say
from .recipe import Recipe, Stage
from .report import write_report
from .stages import StageContext
from .storage import Store, digest, locked, read_json, write_json

VERSIONED = (
    "torch",
    "transformers",
    "accelerate",
    "lm_eval",
    "tokenizers",
    "safetensors",
    "bitsandbytes",
    "gptqmodel",
    "torchao",
    "peft",
    "aiohttp",
)


def versions() -> dict:
    out = {"compressor": __version__, "python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine(device: torch.device) -> dict:
    """What latency figures depend on; part of the measurement cache key."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "device": str(device),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
    }


class Session:
    """The things one run shares between stages, each made on first use."""

    def __init__(self, recipe: Recipe, store: Store):
        self.recipe, self.spec, self.store = recipe, recipe.spec, store
        self.device = resolve_device(self.spec.device)
        self._blocks: dict[tuple, torch.Tensor] = {}

    @cached_property
    def remote(self) -> Endpoint | None:
        """The black-box teacher, when the recipe's is an openai: endpoint."""
        return Endpoint(self.spec.teacher) if self.spec.teacher.kind == "openai" else None

    @cached_property
    def teacher(self) -> Loaded | Endpoint:
        return self.remote or load_teacher(self.spec.teacher, self.device)

    @cached_property
    def start(self) -> Loaded:
        """What the first stage starts from: the recipe's `base`, else the teacher."""
        return load_teacher(self.spec.base, self.device) if self.spec.base is not None else self.teacher

    @cached_property
    def teacher_key(self) -> str:
        key = {"teacher": self.spec.teacher.identity(), "format": FORMAT_VERSION}
        if self.spec.base is not None:
            key["base"] = self.spec.base.identity()
        return digest(key)

    @cached_property
    def train_source(self) -> TextSource:
        return self.spec.data.train

    @cached_property
    def data_identity(self) -> str:
        budget = self.spec.data.max_train_tokens
        return self.train_source.identity() + (f":first{budget}" if budget else "")

    def stage_keys(self) -> list[str]:
        """key_i = hash(teacher, data, seed, format, params of stages 0..i)."""
        keys, chain = [], []
        for stage in self.recipe.stages:
            chain.append(stage.params())
            keys.append(
                digest(
                    {
                        "format": FORMAT_VERSION,
                        "teacher": self.teacher_key,
                        "data": self.data_identity,
                        "seed": self.spec.seed,
                        "stages": chain,
                    }
                )
            )
        return keys

    @cached_property
    def _documents(self) -> tuple[list[str], list[str]]:
        data = self.spec.data
        train_docs = load_documents(data.train)
        if data.heldout is not None:
            return train_docs, load_documents(data.heldout)
        if data.train.source == "builtin:stdlib-text":
            return train_docs, load_documents(TextSource(source="builtin:stdlib-heldout"))
        return split_heldout(train_docs, data.heldout_fraction)

    def blocks(self, split: str, seq_len: int) -> torch.Tensor:
        if (split, seq_len) not in self._blocks:
            data = self.spec.data
            source = data.heldout.identity() if split == "heldout" and data.heldout else self.train_source.identity()
            blocks = pack(
                lambda: self._documents[0 if split == "train" else 1],
                self.start.tokenizer,
                seq_len,
                cache_key=f"{self.teacher_key}:{source}:{split}:{data.heldout_fraction}",
            )
            if split == "train" and data.max_train_tokens:
                blocks = blocks[: max(1, data.max_train_tokens // seq_len)]
            self._blocks[(split, seq_len)] = blocks
        return self._blocks[(split, seq_len)]

    @cached_property
    def eval_key(self) -> str:
        return digest(
            {
                "eval": self.spec.eval.model_dump(mode="json"),
                "heldout": self.spec.data.model_dump(mode="json"),
                "teacher": self.teacher_key,
                "machine": machine(self.device),
                "format": FORMAT_VERSION,
                "seed": self.spec.seed,
            }
        )

    def measurement(self, key: str, load, is_teacher: bool = False) -> tuple[dict, bool]:
        """Metrics of the artifact `key` (cached per eval settings and machine)."""
        path = self.store.root / "measurements" / f"{key}-{self.eval_key}.json"
        if path.is_file():
            return read_json(path), True
        loaded: Loaded = load()
        say(f"measuring {self.reference_name if is_teacher else key} ...")
        metrics = measure(
            loaded.model,
            loaded.tokenizer,
            loaded.folder,
            self.spec.eval,
            self.blocks("heldout", self.spec.data.seq_len),
            None if is_teacher or self.remote else self.teacher.model,
            self.spec.seed,
        )
        if is_teacher and not self.remote:
            metrics.update(teacher_kl=0.0, top1_agreement=1.0)
        write_json(path, metrics)
        return metrics, False

    @property
    def reference_name(self) -> str:
        """Row 0: the teacher, or with a black-box teacher (not measurable here) the base model."""
        return "base" if self.remote else "teacher"

    @property
    def reference_spec(self):
        return self.spec.base if self.remote else self.spec.teacher

    def reference_model(self) -> Loaded:
        return self.start if self.remote else self.teacher

    def load_artifact(self, key: str) -> Loaded:
        return load_pretrained(str(self.store.path(key)), self.device, dtype="auto")

    def build(self, stage: Stage, key: str, input_key: str | None) -> dict:
        """Run one stage on its input and save the artifact atomically."""
        torch.manual_seed(self.spec.seed)
        source = (
            self.load_artifact(input_key)
            if input_key
            else Loaded(copy.deepcopy(self.start.model), self.start.tokenizer, None)
        )
        ctx = StageContext(
            name=f"{stage.name} ({stage.index + 1}/{len(self.recipe.stages)})",
            config=stage.config,
            device=self.device,
            seed=self.spec.seed,
            scratch=self.store.scratch(key),
            load_teacher=lambda: self.teacher,
            train_blocks=lambda seq_len: self.blocks("train", seq_len),
            seq_len=self.spec.data.seq_len,
            cache_key=f"{self.teacher_key}:{self.data_identity}",
        )
        start = time.time()
        model = stage.module.apply(source.model, source.tokenizer, ctx)
        manifest = {
            "name": stage.name,
            "kind": stage.kind,
            "params": stage.params(),
            "input": input_key,
            "teacher": self.spec.teacher.identity(),
            "seed": self.spec.seed,
            "info": ctx.info,
            "seconds": round(time.time() - start, 2),
            "versions": versions(),
            "format": FORMAT_VERSION,
        }
        with self.store.build(key, manifest) as tmp:
            save = getattr(stage.module, "save", None)
            if save is not None:
                save(model, source.tokenizer, tmp)
            else:
                model.save_pretrained(tmp)
                source.tokenizer.save_pretrained(tmp)
        return self.store.get(key, verify=False)


def run(recipe: Recipe, out: Path, store: Store | None = None) -> dict:
    """Run (or resume) a recipe into `out`; return the run record written to out/run.json."""
    store = store or Store()
    out.mkdir(parents=True, exist_ok=True)
    with locked(out / ".lock", f"output folder {out}", wait=False):
        session = Session(recipe, store)
        keys = session.stage_keys()
        finished = [store.get(k) is not None for k in keys]
        if session.remote is not None and not all(finished):
            session.remote.check()
        say(
            f"recipe {recipe.name}: {len(keys)} stage(s); "
            + ", ".join(f"{s.name} {'cached' if done else 'to run'}" for s, done in zip(recipe.stages, finished))
        )
        start = time.time()
        metrics, cached = session.measurement(session.teacher_key, session.reference_model, is_teacher=True)
        reference = session.reference_spec
        records = [
            {
                "name": session.reference_name,
                "kind": session.reference_name,
                "key": session.teacher_key,
                "cached": cached,
                "seconds": round(time.time() - start, 2),
                "source": reference.source,
                "artifact": str(reference.folder() or reference.target),
                "metrics": metrics,
            }
        ]
        input_key = None
        for stage, key in zip(recipe.stages, keys):
            start = time.time()
            manifest = store.get(key)
            cached = manifest is not None
            if cached:
                say(f"{stage.name}: cached ({key})")
            else:
                with store.lock(key):
                    manifest = store.get(key) or session.build(stage, key, input_key)
            metrics, _ = session.measurement(key, lambda: session.load_artifact(key))
            records.append(
                {
                    "name": stage.name,
                    "kind": stage.kind,
                    "key": key,
                    "cached": cached,
                    "seconds": round(time.time() - start, 2),
                    "build_seconds": manifest.get("seconds"),
                    "artifact": str(store.path(key)),
                    "info": manifest.get("info", {}),
                    "metrics": metrics,
                }
            )
            input_key = key
        record = {
            "recipe": recipe.name,
            "recipe_path": str(recipe.path),
            "seed": recipe.spec.seed,
            "versions": versions(),
            "device": str(session.device),
            "machine": machine(session.device),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stages": records,
            "pick": recipe.spec.pick.model_dump(exclude_none=True),
        }
        write_json(out / "run.json", record)
        write_report(record, out)
        return record


def evaluate_model(
    model_ref: str,
    spec: EvalSpec,
    out: Path,
    heldout: TextSource,
    seq_len: int,
    seed: int,
    device_name: str = "auto",
    teacher_ref: str | None = None,
) -> dict:
    """`compressor eval`: measure any model (teacher spec or artifact folder) like a stage."""
    from .models import TeacherSpec

    device = resolve_device(device_name)

    def load(ref: str) -> Loaded:
        if Path(ref).is_dir():
            return load_pretrained(ref, device, dtype="auto")
        return load_teacher(TeacherSpec.model_validate(ref), device)

    out.mkdir(parents=True, exist_ok=True)
    with locked(out / ".lock", f"output folder {out}", wait=False):
        loaded = load(model_ref)
        teacher = load(teacher_ref).model if teacher_ref else None
        blocks = pack(load_documents(heldout), loaded.tokenizer, seq_len)
        start = time.time()
        metrics = measure(loaded.model, loaded.tokenizer, loaded.folder, spec, blocks, teacher, seed)
        record = {
            "recipe": None,
            "seed": seed,
            "versions": versions(),
            "device": str(device),
            "machine": machine(device),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stages": [
                {
                    "name": Path(model_ref).name if Path(model_ref).is_dir() else model_ref,
                    "kind": "eval",
                    "key": None,
                    "cached": False,
                    "seconds": round(time.time() - start, 2),
                    "artifact": str(loaded.folder) if loaded.folder else None,
                    "metrics": metrics,
                }
            ],
        }
        write_json(out / "run.json", record)
        write_report(record, out)
        return record
