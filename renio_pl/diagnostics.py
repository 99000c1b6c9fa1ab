"""Round-level diagnostics: how weights, lengths and epistemic markers relate to correctness.

What the paper plots in Figures 5, 7 and 8, logged during `fit` when the rollouts carry
verifier labels. Labels never reach the loss: `Diagnostics.update` reads what the training
step already computed (the (B, T) log-probs and the active weighter's weights), runs each
diagnostic weighter on it under `no_grad`, and accumulates per-rollout values with their
labels over a rollout round; `compute` gathers every process's values (torchmetrics) at the
round's end. Data flows one way: the data module decodes each completion (`Rollout.text`),
`collate_rollouts` carries the texts in `RolloutBatch.texts`, and the markers are counted
here, so the marker list is a model option (`model.diagnostics.init_args.markers`).

Logged per round (`<w>` is a diagnostic weighter's name, `active` the weights trained with):
    diag/<w>/auroc_incorrect          AUROC of the weight for predicting an incorrect rollout
    diag/<w>/weight_correct           mean weight of correct rollouts (and `_incorrect`)
    diag/<w>/pivotal_share            ReNIO weighters: pivotal tokens / generated tokens
                                      (and `_correct`, `_incorrect`)
    diag/len_correct                  generated tokens per correct rollout (and `_incorrect`)
    diag/markers_correct              epistemic markers per correct rollout (and `_incorrect`)
    diag/marker/<marker>_correct      one marker, spaces as `_` (and `_incorrect`)

and, with or without labels, how the trained weights shape the update (means over the round's
micro-batches or optimizer steps):
    diag/active/ess_share             effective sample size of the weights as a share of the
                                      micro-batch, (sum w)^2 / (B sum w^2) (`effective_sample_share`)
    diag/active/top10_loss_share      share of the micro-batch loss carried by the 10% of its
                                      rollouts that carry the most (`top_loss_share`)
    diag/grad_norm                    the gradient's global L2 norm before each optimizer step
    diag/group_accuracy/<group>       training rollouts' accuracy per problem group, when the
                                      data has groups (`data.group_field`)
A value is left out of a round that has no rollout to define it (AUROC: both labels needed).
Held-out accuracy per group is logged by the module as `val/group_accuracy/<group>` (`GroupAccuracy`).

Shapes use the package glossary (`renio_pl/__init__.py`): `B` rollouts, `T` completion tokens, `M` markers.
"""

from __future__ import annotations

import math
import re
import zlib

import torch
from torch import Tensor
from torchmetrics import MeanMetric, Metric
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat

from renio_pl.errors import ConfigError
from renio_pl.weighters import EntropyWeighter, LengthWeighter, ReNIOWeighter, UniformWeighter, Weighter, WeighterInputs

__all__ = [
    "Diagnostics", "ByCorrectness", "GroupAccuracy", "count_markers", "standard_weighters", "effective_sample_share",
    "top_loss_share", "DEFAULT_MARKERS",
]

DEFAULT_MARKERS = ["wait", "let me check", "hmm", "alternatively", "verify"]


def standard_weighters() -> dict[str, Weighter]:
    """The label-free weighters the paper compares, with the release defaults."""
    return {
        "uniform": UniformWeighter(), "length": LengthWeighter(), "entropy": EntropyWeighter(), "renio": ReNIOWeighter()
    }


def _marker_pattern(marker: str) -> re.Pattern:
    """`marker` as a whole word or phrase in any case; a space in it matches any whitespace."""
    return re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, marker.split())) + r"(?!\w)", re.IGNORECASE)


def count_markers(texts: list[str], markers: list[str]) -> Tensor:
    """Occurrences of each marker in each text, case-insensitive, on word boundaries.

    Args:
        texts: B decoded completions.
        markers: M words or phrases (`let me check` also matches `Let me\\ncheck`, not `let me checking`).
    Returns:
        (B, M) float32 counts.
    """
    patterns = [_marker_pattern(m) for m in markers]
    counts = [[len(p.findall(text)) for p in patterns] for text in texts]
    return torch.tensor(counts, dtype=torch.float32).reshape(len(texts), len(markers))


def effective_sample_share(weights: Tensor) -> Tensor | None:
    """Kish's effective sample size of the weights as a share of the batch: `(sum w)^2 / (B sum w^2)`.

    1 when every weight is equal, `k / B` when `k` rollouts share the weight equally and the rest weigh 0.

    Args:
        weights: (B,) float >= 0.
    Returns:
        () float64 in (0, 1], or None when every weight is 0 (or B is 0).
    """
    weights = weights.detach().double()
    squares = (weights**2).sum()
    if squares <= 0:
        return None
    return weights.sum() ** 2 / (len(weights) * squares)


def top_loss_share(contributions: Tensor, share: float = 0.1) -> Tensor | None:
    """Share of the batch loss `sum_i c_i` carried by the `ceil(share * B)` rollouts with the largest `c_i`.

    Args:
        contributions: (B,) float >= 0, each rollout's term of the batch loss, `w_i L_i` (`renio_pl.losses`).
        share: the share of the rollouts counted (0 < share <= 1).
    Returns:
        () float64 in [share-ish, 1], or None when the loss is 0 (or B is 0).
    """
    contributions = contributions.detach().double()
    total = contributions.sum()
    if len(contributions) == 0 or total <= 0:
        return None
    top = torch.topk(contributions, math.ceil(share * len(contributions))).values
    return top.sum() / total


class GroupAccuracy(Metric):
    """Accuracy per problem group over an epoch or a round (groups named by strings, gathered over processes).

    A group is keyed by the CRC32 of its name, so every process codes it the same way; names
    are remembered where they are seen (every process loads the same rows).
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("codes", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")
        self.names: dict[int, str] = {}

    def update(self, groups: list[str | None], correct: Tensor) -> None:
        """Add rollouts: `groups` B names (None: left out), `correct` (B,) 1.0 / 0.0."""
        kept = [i for i, group in enumerate(groups) if group is not None]
        if not kept:
            return
        codes = [zlib.crc32(groups[i].encode()) for i in kept]
        self.names.update(zip(codes, (groups[i] for i in kept)))
        self.codes.append(torch.tensor(codes, dtype=torch.int64, device=self.device))
        self.correct.append(correct.detach().to(self.device, torch.float64)[kept])

    def compute(self) -> dict[str, float]:
        """Accuracy of each group seen, by name (empty when nothing was added)."""
        if isinstance(self.codes, list) and not self.codes:
            return {}
        codes, correct = dim_zero_cat(self.codes), dim_zero_cat(self.correct)
        return {self.names.get(code, str(code)): float(correct[codes == code].mean()) for code in codes.unique().tolist()}


def _unit_interval(values: Tensor) -> Tensor:
    """`values` mapped to [0, 1] keeping their order and ties (else torchmetrics would take them for logits)."""
    low, high = values.min(), values.max()
    return (values - low) / (high - low).clamp(min=torch.finfo(values.dtype).tiny)


class ByCorrectness(Metric):
    """Per-rollout values of a round with their labels: means over correct / incorrect rollouts, and AUROC.

    States are lists concatenated over processes, so `compute` is the same on every rank.

    Args:
        auroc: also report `auroc_incorrect`, the AUROC of the value for predicting an incorrect rollout.
        overall: also report `all`, the mean over every rollout.
    """

    full_state_update = False

    def __init__(self, auroc: bool = False, overall: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.auroc, self.overall = auroc, overall
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.add_state("weights", default=[], dist_reduce_fx="cat")
        self.add_state("incorrect", default=[], dist_reduce_fx="cat")

    def update(self, values: Tensor, correct: Tensor, weights: Tensor | None = None) -> None:
        """Add a batch.

        Args:
            values: (B,) float, one value per rollout.
            correct: (B,) float 1.0 correct / 0.0 incorrect.
            weights: (B,) float >= 0, each value's weight in the means (default 1: a plain mean).
        """
        values = values.detach().double()
        self.values.append(values)
        self.weights.append(torch.ones_like(values) if weights is None else weights.detach().double())
        self.incorrect.append(correct.to(values.device) == 0)

    def compute(self) -> dict[str, Tensor]:
        """`correct`, `incorrect` (and `all`): weighted means, each when its rollouts have weight;
        `auroc_incorrect` when both labels occur. 0-dim float64 tensors."""
        values, weights, incorrect = (dim_zero_cat(s) for s in (self.values, self.weights, self.incorrect))
        groups = {"correct": ~incorrect, "incorrect": incorrect}
        if self.overall:
            groups["all"] = torch.ones_like(incorrect)
        result = {}
        for name, rows in groups.items():
            total = weights[rows].sum()
            if total > 0:
                result[name] = (values[rows] * weights[rows]).sum() / total
        if self.auroc and incorrect.any() and not incorrect.all():
            result["auroc_incorrect"] = binary_auroc(_unit_interval(values), incorrect.long())
        return result


class Diagnostics(torch.nn.Module):
    """Weights, lengths and epistemic markers of correct vs incorrect rollouts, per round (never trained on).

    The diagnostic weighters run on the same scored batch as the active weighter, with no
    extra forward. They are held in a plain dict, not as submodules: their state (ReNIO's
    `ema` running mean) is their own, apart from the active weighter's, and stays out of
    checkpoints. Set `model.diagnostics: null` to turn diagnostics off.

    Args:
        weighters: diagnostic weighters by name (letters, digits, `_`, `-`), logged as
            `diag/<name>/...`; None: `uniform`, `length`, `entropy` and `renio` (ReNIO with the
            release defaults). The active weighter is always logged, as `active`.
        markers: epistemic markers counted in each decoded completion, case-insensitive, on
            word boundaries; a space inside a marker matches any whitespace. Empty: no counts.
    """

    def __init__(
        self, weighters: dict[str, Weighter] | None = None, markers: list[str] = DEFAULT_MARKERS  # noqa: B006
    ) -> None:
        super().__init__()
        prefix = "model.diagnostics.init_args"
        weighters = standard_weighters() if weighters is None else dict(weighters)
        for name in weighters:
            if not re.fullmatch(r"[\w-]+", name, re.ASCII) or name == "active":
                raise ConfigError(
                    f"{prefix}.weighters: names are letters, digits, _ and - (and not `active`, the trained weights); "
                    f"got {name!r}"
                )
        slugs = ["_".join(re.findall(r"\w+", m.lower())) for m in markers]
        if not all(slugs) or len(set(slugs)) != len(slugs):
            raise ConfigError(
                f"{prefix}.markers must be distinct words or phrases (compared in lower case, spaces as _); "
                f"got {markers}"
            )
        self.weighters = weighters  # a plain dict, not submodules: see the class docstring
        self.markers, self.marker_slugs = list(markers), slugs
        metrics = {f"{name}/weight": ByCorrectness(auroc=True) for name in ["active", *weighters]}
        renio = ["active", *(name for name, w in weighters.items() if isinstance(w, ReNIOWeighter))]
        metrics.update({f"{name}/pivotal_share": ByCorrectness(overall=True) for name in renio})
        metrics["len"] = ByCorrectness()
        if self.markers:
            metrics["markers"] = ByCorrectness()
            metrics.update({f"marker/{slug}": ByCorrectness() for slug in slugs})
        self.metrics = torch.nn.ModuleDict(metrics)
        self.means = torch.nn.ModuleDict({name: MeanMetric() for name in ("ess_share", "top10_loss_share", "grad_norm")})
        self.groups = GroupAccuracy()

    @torch.no_grad()
    def update_shape(self, weights: Tensor, rollout_losses: Tensor, groups: list[str | None] | None = None,
                      correct: Tensor | None = None) -> None:
        """Add one micro-batch's shape of the update (labels not needed; rows without tokens count as 0).

        Args:
            weights: (B,) float32, the trained weights.
            rollout_losses: (B,) float, each rollout's unweighted loss `L_i` (`renio_pl.losses.rollout_losses`).
            groups: the B problems' groups (None: none), for accuracy per group when `correct` is set.
            correct: (B,) float 1.0 / 0.0 verifier labels, or None.
        """
        ess = effective_sample_share(weights)
        if ess is not None:
            self.means["ess_share"].update(ess)
        top = top_loss_share(weights.detach().double() * rollout_losses.detach().double().clamp(min=0))
        if top is not None:
            self.means["top10_loss_share"].update(top)
        if groups is not None and correct is not None:
            self.groups.update(groups, correct)

    def update_grad_norm(self, norm: Tensor) -> None:
        """Add one optimizer step's gradient norm (a 0-dim tensor)."""
        self.means["grad_norm"].update(norm.detach().double())

    @torch.no_grad()
    def update(self, inputs: WeighterInputs, weights: Tensor, active: Weighter, texts: list[str] | None = None) -> None:
        """Add one labelled micro-batch (rollouts without a generated token are left out).

        Args:
            inputs: the batch as the active weighter saw it; `correct` (B,) must be set.
            weights: (B,) float32, the active weighter's weights (the ones trained with).
            active: the active weighter; not run again (a diagnostic weighter that is the same
                object gets `weights` too), so its state moves once per step.
            texts: the B decoded completions, for the marker counts; None leaves them out.
        """
        if inputs.correct is None:
            raise ValueError("Diagnostics.update needs correctness labels (WeighterInputs.correct); got None")
        valid = inputs.has_tokens  # (B,)
        correct = inputs.correct.to(valid.device)[valid]
        lengths = inputs.mask.sum(dim=1)[valid].float()  # (B',)
        for name, weighter in [("active", active), *self.weighters.items()]:
            diagnostic = weights if weighter is active else weighter.to(valid.device)(inputs)  # (B,)
            self.metrics[f"{name}/weight"].update(diagnostic[valid], correct)
            if isinstance(weighter, ReNIOWeighter):
                pivotal = weighter.pivotal(inputs).sum(dim=1)[valid].float()
                self.metrics[f"{name}/pivotal_share"].update(pivotal / lengths, correct, weights=lengths)
        self.metrics["len"].update(lengths, correct)
        if texts is not None and self.markers:
            kept = [text for text, keep in zip(texts, valid.tolist()) if keep]
            counts = count_markers(kept, self.markers).to(valid.device)  # (B', M)
            self.metrics["markers"].update(counts.sum(dim=1), correct)
            for slug, column in zip(self.marker_slugs, counts.unbind(dim=1)):
                self.metrics[f"marker/{slug}"].update(column, correct)

    def compute(self) -> dict[str, float]:
        """This round's values by log name (see the module docstring), gathered over processes."""
        logged = {}
        for key, metric in self.metrics.items():
            if not metric.update_called:
                continue
            for part, value in metric.compute().items():
                logged[_log_name(key, part)] = float(value)
        for name, metric in self.means.items():
            if metric.update_called:
                logged[f"diag/{'' if name == 'grad_norm' else 'active/'}{name}"] = float(metric.compute())
        if self.groups.update_called:
            logged.update({f"diag/group_accuracy/{group}": value for group, value in self.groups.compute().items()})
        return logged

    def reset(self) -> None:
        """Start a new round."""
        for metric in [*self.metrics.values(), *self.means.values(), self.groups]:
            metric.reset()


def _log_name(key: str, part: str) -> str:
    """`diag/` name of a metric's result: `<w>/weight` + `auroc_incorrect` -> `diag/<w>/auroc_incorrect`."""
    if part == "auroc_incorrect":
        return f"diag/{key.removesuffix('/weight')}/auroc_incorrect"
    return f"diag/{key}" if part == "all" else f"diag/{key}_{part}"
