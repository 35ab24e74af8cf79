"""`prune`: remove whole attention heads, MLP channels, hidden channels and layers.

Importance (`method`):
- `magnitude`: the L1 or L2 norm of every weight that belongs to the structure;
- `taylor`: first-order Taylor |w * dL/dw| summed over those weights, on calibration batches;
- `activation` (as in Minitron): mean |activation| of the channel / L2 norm of the head's output
  on calibration batches; for hidden channels, the mean |x| of the residual stream at every
  block input.
Layers are always ranked by block influence on calibration data (1 - cos(input, output) of the
block, as in ShortGPT): the blocks that change their input least go first.

Widths are uniform across layers: a stock HF config has one intermediate_size and one head
count, and an artifact must load with plain `from_pretrained`. With grouped-query attention,
`gqa: groups` removes whole KV groups (a KV head with its query heads) and `gqa: within`
removes the same number of query heads inside every group; the stage reports how it rounded.
"""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..data import Batches, Calibration
from ..families import Rows, family_of
from ..layerwise import Checkpoint, Reader, Streamed, streaming, transplant
from ..memory import cut_copy, gradients, measuring, parameters
from ..models import SHAPE_KEYS, count_params, decoder_layers, head_dim, keep_layers
from ..progress import Bar, say
from ..slicing import keep_heads, keep_hidden, keep_mlp_channels
from .base import StageContext, StageKind, layerwise_field

TARGETS = ("layers", "heads", "mlp", "hidden")

Amount = float | Literal["auto"]


class Targets(BaseModel):
    """Fraction of each structure to remove, or "auto" to solve for `target_params`."""

    model_config = ConfigDict(extra="forbid")

    layers: Amount = 0.0
    heads: Amount = 0.0
    mlp: Amount = 0.0
    hidden: Amount = 0.0

    @field_validator("*")
    @classmethod
    def _ratio(cls, value):
        if value != "auto" and not 0 <= value < 1:
            raise ValueError(f"must be a fraction in [0, 1) or 'auto', got {value}")
        return value

    def autos(self) -> list[str]:
        return [t for t in TARGETS if getattr(self, t) == "auto"]


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    targets: Targets
    target_params: int | None = Field(None, ge=1, description="solve the 'auto' targets for this parameter count")
    method: Literal["magnitude", "taylor", "activation"] = "taylor"
    norm: Literal["l1", "l2"] = Field("l2", description="magnitude only")
    gqa: Literal["groups", "within"] = "groups"
    multiple_of: int = Field(1, ge=1, description="round kept MLP and hidden widths to a multiple of this")
    calibration: Calibration = Calibration()
    layerwise: bool = layerwise_field("read the input a decoder layer at a time, for its importance and its cut")

    @model_validator(mode="after")
    def _streamable(self) -> "Config":
        if self.layerwise and self.method == "taylor":
            raise ValueError(
                "layerwise: taylor needs every layer's gradients at once; method activation or magnitude "
                "reads a layer at a time"
            )
        return self


# --- how many of each structure stay -----------------------------------------------------------


def _head_counts(shape: dict, gqa: str, hidden_fixed: bool) -> list[tuple[int, int]]:
    """(query heads, KV heads) a pruned model may have. transformers' Llama config requires
    hidden_size divisible by the number of query heads, so while the hidden size stays, only
    counts that divide it are allowed."""
    n_q, n_kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    group = n_q // n_kv
    if gqa == "groups":
        counts = [(kv * group, kv) for kv in range(1, n_kv + 1)]
    else:
        counts = [(n_kv * per, n_kv) for per in range(1, group + 1)]
    return [c for c in counts if not hidden_fixed or shape["hidden_size"] % c[0] == 0]


def plan(shape: dict, targets: dict, gqa: str, multiple_of: int) -> tuple[dict, list[str]]:
    """The shape after pruning, and one note per rounding. Raises ValueError for an impossible one."""
    notes, out = [], dict(shape, head_dim=head_dim(shape))  # a head keeps its width whatever else goes
    n_l, n_q, n_kv = shape["num_hidden_layers"], shape["num_attention_heads"], shape["num_key_value_heads"]
    if targets["layers"]:
        drop = round(targets["layers"] * n_l)
        if drop >= n_l:
            raise ValueError(f"targets.layers: removing {drop} of {n_l} layers leaves none")
        out["num_hidden_layers"] = n_l - drop
        notes.append(f"layers: drop {drop} of {n_l} ({drop / n_l:.0%} for {targets['layers']:.0%} asked)")
    if targets["heads"]:
        group = n_q // n_kv
        if gqa == "within" and round(targets["heads"] * group) >= group:
            raise ValueError(
                f"targets.heads: removing {targets['heads']:.0%} of the {group} query heads of each KV "
                "group prunes whole groups; use gqa: groups"
            )
        want = (1 - targets["heads"]) * n_q
        counts = [c for c in _head_counts(shape, gqa, hidden_fixed=not targets["hidden"]) if c[0] < n_q]
        if not counts:
            raise ValueError(
                f"targets.heads: no smaller head count fits ({gqa}; hidden_size {shape['hidden_size']} "
                f"must divide by the number of query heads)"
            )
        q, kv = min(counts, key=lambda c: (abs(c[0] - want), c[0]))
        out["num_attention_heads"], out["num_key_value_heads"] = q, kv
        how = (
            f"remove {n_kv - kv} of {n_kv} KV groups with their {group} query heads each"
            if gqa == "groups"
            else f"remove {group - q // n_kv} of {group} query heads in each of {n_kv} KV groups"
        )
        notes.append(
            f"heads: {how}: {q} of {n_q} query heads stay ({1 - q / n_q:.0%} removed for "
            f"{targets['heads']:.0%} asked; feasible counts {[c[0] for c in counts] + [n_q]})"
        )
    for target, key in (("mlp", "intermediate_size"), ("hidden", "hidden_size")):
        if targets[target]:
            width = shape[key]
            step = math.lcm(multiple_of, out["num_attention_heads"]) if key == "hidden_size" else multiple_of
            keep = max(step, int(round(width * (1 - targets[target]) / step)) * step)
            if keep >= width:
                raise ValueError(
                    f"targets.{target}: {targets[target]} of {width} rounds to no change "
                    f"(kept widths are multiples of {step})"
                )
            out[key] = keep
            notes.append(
                f"{target}: keep {keep} of {width} ({1 - keep / width:.0%} removed "
                f"for {targets[target]:.0%} asked; multiple of {step})"
            )
    return out, notes


def shape_params(shape: dict, like: dict) -> int:
    """Parameters of a model of `shape` (a meta-device instance of the same family)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{**like, **shape})
    cfg.head_dim = head_dim(like)
    with torch.device("meta"):
        return count_params(AutoModelForCausalLM.from_config(cfg))


def solve_targets(cfg: Config, shape: dict, like: dict) -> dict:
    """Concrete fractions: 'auto' targets share one fraction, bisected to reach target_params."""
    fixed = {t: (0.0 if v == "auto" else v) for t, v in cfg.targets.model_dump().items()}
    autos = cfg.targets.autos()
    if not autos:
        return fixed
    if cfg.target_params is None:
        raise ValueError(f"targets {', '.join(autos)} are 'auto': give target_params")

    def params_at(r: float) -> int | None:
        try:
            new, _ = plan(shape, {**fixed, **{t: r for t in autos}}, cfg.gqa, cfg.multiple_of)
        except ValueError:
            return None
        return shape_params(new, like)

    lo, hi = 0.0, 0.99
    while params_at(hi) is None and hi > 0.01:  # the largest fraction that still leaves a model
        hi -= 0.01
    if (params_at(lo) or 0) <= cfg.target_params:
        raise ValueError(f"target_params {cfg.target_params:,} is already met without pruning the auto targets")
    smallest = params_at(hi)
    if smallest is None or smallest > cfg.target_params:
        raise ValueError(f"target_params {cfg.target_params:,} cannot be reached by pruning {', '.join(autos)}")
    for _ in range(30):
        mid = (lo + hi) / 2
        got = params_at(mid)
        if got is not None and got <= cfg.target_params:
            hi = mid
        else:
            lo = mid
    return {**fixed, **{t: hi for t in autos}}


# --- importance --------------------------------------------------------------------------------


class Scores:
    """Per-structure importance: MLP channels, query heads and KV heads of every layer (KV heads
    score their own k/v weights; a whole group adds its query heads), hidden channels, and the
    block influence of every layer."""

    def __init__(self, model: torch.nn.Module):
        n_layers = len(decoder_layers(model))
        self.mlp: list = [0.0] * n_layers
        self.head: list = [0.0] * n_layers
        self.kv: list = [0.0] * n_layers
        self.hidden = 0.0
        self.block = [0.0] * n_layers

    def of_layer(self, j: int) -> "Scores":
        """Layer j's scores alone (the hidden channels' are the model's), for a model of that layer."""
        alone = copy.copy(self)
        alone.mlp, alone.head, alone.kv = [self.mlp[j]], [self.head[j]], [self.kv[j]]
        return alone

    def group(self, i: int, group: int) -> torch.Tensor:
        """Importance of each KV group of layer i: its KV head plus its query heads."""
        return self.kv[i] + self.head[i].view(-1, group).sum(1)


def _weight_scores(model: torch.nn.Module, scores: Scores, value, reader: Reader | None = None) -> None:
    """Score structures from a per-weight quantity (|w|^p, or |w * grad| for Taylor) of the
    projections that carry them, as the family lays them out (fused or not). With a `reader`,
    each decoder layer is read for its turn and dropped after."""
    cfg = model.config
    family = family_of(model)
    hd = head_dim(cfg)
    hidden = value(model.get_input_embeddings()).sum(0)
    for i, layer in enumerate(decoder_layers(model)):
        if reader is not None:
            reader.load(layer)
        p = family.parts(layer, cfg)
        o, down = layer.get_submodule(family.o_proj), layer.get_submodule(family.down_proj)
        scores.mlp[i] = value(p["gate"]).sum(1) + value(p["up"]).sum(1) + value(down).sum(0)
        q = value(p["q"]).sum(1).view(-1, hd).sum(1) + value(o).sum(0).view(-1, hd).sum(1)
        kv = value(p["k"]).sum(1).view(-1, hd).sum(1) + value(p["v"]).sum(1).view(-1, hd).sum(1)
        scores.head[i], scores.kv[i] = q, kv
        for linear in family.readers(layer, cfg):
            hidden = hidden + value(linear).sum(0)
        for linear in family.writers(layer):
            hidden = hidden + value(linear).sum(1)
        if reader is not None:
            reader.drop(layer)
    scores.hidden = hidden


def _calibration_pass(model, batches, n_batches: int, taylor: bool, activation: bool, scores: Scores) -> None:
    """Forward (and for Taylor, backward) passes that fill block influence, activation scores
    and gradients."""
    layers = decoder_layers(model)
    family = family_of(model)
    hd = head_dim(model.config)
    hooks, grads_on = [], taylor
    acc = {"mlp": [0.0] * len(layers), "head": [0.0] * len(layers), "hidden": 0.0, "tokens": 0}

    def block_hook(i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.detach().float(), y.detach().float(), dim=-1)
            scores.block[i] += (1 - cos).sum().item()
            if activation:
                acc["hidden"] = acc["hidden"] + x.detach().float().abs().sum((0, 1))

        return hook

    def down_hook(i):
        def hook(module, args):
            acc["mlp"][i] = acc["mlp"][i] + args[0].detach().float().abs().sum((0, 1))

        return hook

    def o_hook(i):
        def hook(module, args):
            x = args[0].detach().float()
            acc["head"][i] = acc["head"][i] + x.view(*x.shape[:-1], -1, hd).norm(dim=-1).sum((0, 1))

        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(block_hook(i), with_kwargs=True))
        if activation:
            hooks.append(layer.get_submodule(family.down_proj).register_forward_pre_hook(down_hook(i)))
            hooks.append(layer.get_submodule(family.o_proj).register_forward_pre_hook(o_hook(i)))
    try:
        model.zero_grad(set_to_none=True)
        with Bar("pruning importance", n_batches, unit="calibration batch") as bar:
            for b in range(n_batches):
                ids = batches(b)["input_ids"].to(model.device)
                acc["tokens"] += ids.numel()
                with torch.set_grad_enabled(grads_on):
                    # without gradients only the hooks' activations count: the head runs on one position
                    # (with a 262k vocabulary it is most of a forward pass)
                    out = model(input_ids=ids, labels=ids) if grads_on else model(input_ids=ids, logits_to_keep=1)
                if grads_on:
                    out.loss.backward()
                bar.update(1)
    finally:
        for h in hooks:
            h.remove()
    n = max(acc["tokens"], 1)
    scores.block = [s / n for s in scores.block]
    if activation:
        scores.mlp = [a / n for a in acc["mlp"]]
        scores.head = [a / n for a in acc["head"]]
        scores.kv = [torch.zeros(model.config.num_key_value_heads) for _ in layers]  # activations live on q heads
        scores.hidden = acc["hidden"] / n


def _weight_and_grad(x) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A module's weight and its gradient, or those rows of them (`Rows` of a fused Linear)."""
    return (x.weight, x.grad) if isinstance(x, Rows) else (x.weight, x.weight.grad)


def _magnitude(kind: str):
    """|w| (L1) or w^2 (L2: ranking by the sum of squares is ranking by the norm)."""
    if kind == "l1":
        return lambda x: _weight_and_grad(x)[0].float().abs()
    return lambda x: _weight_and_grad(x)[0].float().pow(2)


def _taylor(x) -> torch.Tensor:
    w, g = _weight_and_grad(x)
    return (w.float() * g.float()).abs() if g is not None else torch.zeros_like(w, dtype=torch.float32)


def importance(
    model: torch.nn.Module,
    cfg: Config,
    batches,
    n_batches: int,
    need_blocks: bool,
    need_widths: bool = True,
    reader: Reader | None = None,
) -> Scores:
    """Block influence when layers go, the method's scores when widths go (a layers-only prune
    needs forward passes alone: no gradients, no activation statistics). With a `reader`, `model`
    is `layerwise.streaming`'s: its layers read their weights for each pass."""
    scores = Scores(model)
    method = cfg.method if need_widths else "magnitude"
    if method != "magnitude" or need_blocks:
        _calibration_pass(model, batches, n_batches, method == "taylor", method == "activation", scores)
    with torch.no_grad():
        if need_widths and method != "activation":
            _weight_scores(model, scores, _magnitude(cfg.norm) if method == "magnitude" else _taylor, reader)
    model.zero_grad(set_to_none=True)
    return scores


# --- apply -------------------------------------------------------------------------------------


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(score, k).indices.sort().values


def prune(model: torch.nn.Module, ctx: StageContext) -> torch.nn.Module | Path:
    """The pruned model (`layerwise`: `model` is the input's skeleton, and the folder the pruned
    model was written to is returned); what was removed and how it rounded go to ctx.info."""
    cfg: Config = ctx.config
    model = model if cfg.layerwise else model.float()
    before = count_params(model)
    shape = {k: getattr(model.config, k) for k in SHAPE_KEYS}
    like = {**model.config.to_dict(), **shape}
    ratios = solve_targets(cfg, shape, like)
    target, notes = plan(shape, ratios, cfg.gqa, cfg.multiple_of)
    say(f"{ctx.name}: {cfg.method} importance; " + "; ".join(notes))
    blocks = ctx.train_blocks(ctx.seq_len)
    batches = Batches(blocks, cfg.calibration.batch_size, ctx.seed)
    n_batches = math.ceil(cfg.calibration.samples / cfg.calibration.batch_size)
    drops_layers = target["num_hidden_layers"] < shape["num_hidden_layers"]
    widths = ("intermediate_size", "hidden_size", "num_attention_heads")
    drops_widths = any(target[k] < shape[k] for k in widths)
    if cfg.layerwise:
        streamed = streaming(ctx.source, ctx.device, torch.float32)
        reader = Reader(streamed, Checkpoint(ctx.source), ctx.device)
        scores = importance(streamed, cfg, batches, n_batches, drops_layers, drops_widths, reader)
        del streamed, reader
    else:
        scores = importance(model, cfg, batches, n_batches, need_blocks=drops_layers, need_widths=drops_widths)

    kept = list(range(shape["num_hidden_layers"]))
    if drops_layers:
        order = sorted(range(shape["num_hidden_layers"]), key=lambda i: scores.block[i], reverse=True)
        kept = sorted(order[: target["num_hidden_layers"]])
        notes.append(
            f"layers kept {kept} (block influence {[round(scores.block[i], 4) for i in kept]}), dropped "
            f"{sorted(set(range(shape['num_hidden_layers'])) - set(kept))}"
        )
        scores.mlp, scores.head, scores.kv = ([s[i] for i in kept] for s in (scores.mlp, scores.head, scores.kv))
    pruned = keep_layers(model, kept) if drops_layers or cfg.layerwise else model
    if cfg.layerwise:
        written = _cut_a_layer_at_a_time(model, pruned, kept, target, shape, scores, ctx)
    else:
        _cut(pruned, target, shape, scores, cfg.gqa)
    say(f"{ctx.name}: {before:,} -> {count_params(pruned):,} parameters")
    ctx.info.update(
        method=cfg.method,
        ratios=ratios,
        rounding=notes,
        params_before=before,
        params_after=count_params(pruned),
        kept_layers=kept,
        shape={k: getattr(pruned.config, k) for k in shape},
    )
    return written if cfg.layerwise else pruned


def _cut(model: torch.nn.Module, target: dict, shape: dict, scores: Scores, gqa: str) -> None:
    """Slice `model` (its decoder layers the kept ones, `scores` theirs) to the `target` shape."""
    # widths before heads: the final hidden size is a multiple of the final head count
    if target["intermediate_size"] < shape["intermediate_size"]:
        keep_mlp_channels(model, [_top(s, target["intermediate_size"]) for s in scores.mlp])
    if target["hidden_size"] < shape["hidden_size"]:
        keep_hidden(model, _top(scores.hidden, target["hidden_size"]))
    if target["num_attention_heads"] < shape["num_attention_heads"]:
        group = shape["num_attention_heads"] // shape["num_key_value_heads"]
        keep_kv, keep_q = [], []
        for i, head_score in enumerate(scores.head):
            if gqa == "groups":
                kv = _top(scores.group(i, group), target["num_key_value_heads"])
                q = torch.cat([torch.arange(g * group, (g + 1) * group) for g in kv.tolist()])
            else:
                kv = torch.arange(shape["num_key_value_heads"])
                per = target["num_attention_heads"] // shape["num_key_value_heads"]
                q = torch.cat([g * group + _top(head_score[g * group : (g + 1) * group], per) for g in kv.tolist()])
            keep_kv.append(kv)
            keep_q.append(q)
        keep_heads(model, keep_kv, keep_q)


def _cut_a_layer_at_a_time(
    skeleton: torch.nn.Module, pruned: torch.nn.Module, kept: list[int], target: dict, shape: dict, scores, ctx
) -> Path:
    """`_cut` with one decoder layer in memory: the pruned skeleton is cut with its layers on the
    meta device (its embeddings, norm and head read and cut for real), then each kept layer is
    read from `ctx.source`, cut by the same code in a model that holds it alone, written and
    dropped. The same slices, so the same weights as cutting the whole model."""
    source = Checkpoint(ctx.source)
    reader = Reader(skeleton, source, ctx.device)  # the input's names: layer i is read as itself
    Reader(pruned, source, ctx.device).load_outside_layers(pruned)  # names a dropped layer does not change
    _cut(pruned, target, shape, scores, ctx.config.gqa)
    out = ctx.scratch / "layerwise"
    shutil.rmtree(out, ignore_errors=True)  # a killed attempt's layers
    stream = Streamed(pruned, source, out, ctx.device)
    layers = decoder_layers(skeleton)
    skeleton.model.layers = torch.nn.ModuleList()  # what a model of one layer is copied from
    with Bar(f"{ctx.name}: cutting", len(kept), unit="layer") as bar:
        for j, i in enumerate(kept):
            reader.load(layers[i])
            alone = copy.deepcopy(skeleton)
            alone.model.layers = torch.nn.ModuleList([layers[i]])
            _cut(alone, target, shape, scores.of_layer(j), ctx.config.gqa)
            transplant(layers[i], decoder_layers(pruned)[j])
            reader.drop(layers[i])
            stream.done(decoder_layers(pruned)[j], changed=True)
            bar.update(1)
    for module in stream.outside_layers(pruned):
        stream.done(module, changed=True, recurse=False)
    stream.finish(pruned.config)
    return out


class Prune(StageKind):
    Config = Config

    def check(self, cfg: Config, shape: dict, teacher_shape: dict) -> dict:
        ratios = solve_targets(cfg, shape, {"model_type": "llama", **teacher_shape, **shape})
        return plan(shape, ratios, cfg.gqa, cfg.multiple_of)[0]

    def memory(self, cfg: Config, before: dict, after: dict, teacher: dict, run) -> tuple[dict, list[str]]:
        batch = cfg.calibration.batch_size
        if cfg.method == "taylor":
            fewer = [f"calibration.batch_size: {batch // 2}"] if batch > 1 else []
            streamed = "method: activation with layerwise: true"
            return gradients(before, batch, run.seq_len), [*fewer, "method: activation", streamed]
        if cfg.layerwise:  # the importance pass, or the cut: a layer and its cut copy (or cut tables)
            scoring = measuring(before, batch, run.seq_len, layerwise=True)
            keep = ("runtime", "embeddings, head", "one decoder layer")
            cutting = {**{k: scoring[k] for k in keep}, "the cut copy": cut_copy(before, after)}
            return max(scoring, cutting, key=lambda parts: sum(parts.values())), []
        # loading maps the checkpoint while its tensors are copied in, saving serialises a copy
        whole = {**measuring(before, batch, run.seq_len), "a second copy, loading or saving": 4 * parameters(before)}
        return whole, ["layerwise: true"]

    def streams(self, cfg: Config) -> bool:
        return cfg.layerwise

    def apply(self, model: torch.nn.Module, tokenizer, ctx: StageContext) -> torch.nn.Module | Path:
        return prune(model, ctx)
