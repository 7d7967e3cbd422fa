"""Evaluation suites behind one registry, used by training and by ``python -m pm_dist.evaluate``.

A suite is a small dataclass whose fields are its options and whose ``run`` returns result dicts
(``name``, ``kind``, metrics, ``curve``; see ``eval.report``). Every rank runs it (embedding shared
out) and gets the same results. ``headline`` picks the few numbers logged to metrics.jsonl and
TensorBoard as ``eval/<result name>/<key>``.

Built in: ``bin`` (insightface ``.bin`` sets, 10-fold), ``pairs`` (pair/template lists, TAR@FAR),
``identification`` (gallery/probe subject lists, 1:N), ``synthetic`` (held-out synthetic
identities). A new suite is a dataclass registered with ``@register_suite("name")``; a run config
then lists it under ``eval.suites`` (``- {name: mine, option: value}``) and the command line runs
it with ``--suite name key=value ...`` (docs/extending.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pm_dist.suggest import did_you_mean

from .from_lists import evaluate_identification_lists, evaluate_pair_list
from .synthetic import evaluate_synthetic
from .verification import evaluate_verification, load_bin


@dataclass(frozen=True)
class EvalContext:
    """How every suite of one evaluation embeds its images."""

    device: Any = "cpu"
    batch_size: int = 64
    image_size: int = 112  # model input size; images of another size are resized
    flip: bool = True  # add the mirrored image's embedding (insightface's protocol)
    tar_method: str = "nearest"


class Suite:
    """Base of evaluation suites: subclasses are dataclasses registered with ``register_suite``."""

    name: ClassVar[str] = ""  # the registry key, set by register_suite

    def run(self, model, ctx: EvalContext) -> list[dict]:
        raise NotImplementedError

    def headline(self, result: dict) -> dict[str, float]:
        """The numbers of ``result`` worth a curve over training: accuracy and rank-1 by default."""
        out = {}
        if result.get("accuracy") is not None:
            out["accuracy"] = float(result["accuracy"])
        rank1 = (result.get("rank") or {}).get("1")
        if rank1 is not None:
            out["rank1"] = float(rank1)
        return out


SUITES: dict[str, type[Suite]] = {}


def register_suite(name: str):
    """Class decorator: ``@register_suite("mine")`` on a ``Suite`` dataclass."""
    def register(cls: type[Suite]) -> type[Suite]:
        if not (isinstance(cls, type) and issubclass(cls, Suite)):
            raise TypeError(f"suite {name!r}: {cls!r} is not a pm_dist.eval.suites.Suite subclass")
        cls.name = name
        SUITES[name] = cls
        return cls
    return register


def suite_class(name: str) -> type[Suite]:
    if name not in SUITES:
        raise ValueError(f"unknown evaluation suite {name!r}{did_you_mean(name, SUITES)}: "
                         f"registered suites are {', '.join(sorted(SUITES))}")
    return SUITES[name]


def run_suites(model, suites: list[Suite], ctx: EvalContext) -> list[dict]:
    """Every suite in order; each result carries the suite's ``headline`` numbers."""
    results = []
    for suite in suites:
        for result in suite.run(model, ctx):
            result["headline"] = suite.headline(result)
            results.append(result)
    return results


@register_suite("bin")
@dataclass
class BinSuite(Suite):
    """An insightface ``.bin`` verification set (lfw.bin, cfp_fp.bin, agedb_30.bin, ...)."""

    path: str

    def run(self, model, ctx):
        vset = load_bin(self.path, ctx.image_size)
        return [evaluate_verification(model, vset, ctx.batch_size, ctx.device, ctx.flip,
                                      tar_method=ctx.tar_method)]


@register_suite("pairs")
@dataclass
class PairListSuite(Suite):
    """A pair list (``a b label``): image pairs, or template pairs with a template list."""

    pairs: str
    templates: str | None = None
    root: str | None = None  # folder the list's image paths are relative to (default: its own)

    def run(self, model, ctx):
        return [evaluate_pair_list(model, self.pairs, self.templates, self.root, ctx.image_size,
                                   ctx.batch_size, ctx.device, ctx.flip, ctx.tar_method)]


@register_suite("identification")
@dataclass
class IdentificationListSuite(Suite):
    """1:N search of probe templates against gallery templates (subject lists)."""

    templates: str
    gallery: str
    probes: str
    root: str | None = None

    def run(self, model, ctx):
        return [evaluate_identification_lists(model, self.templates, self.gallery, self.probes,
                                              self.root, ctx.image_size, ctx.batch_size,
                                              ctx.device, ctx.flip)]


@register_suite("synthetic")
@dataclass
class SyntheticSuite(Suite):
    """The synthetic held-out identities: 10-fold pairs and open-set 1:N.

    ``dataset`` is a ``pm_dist.data.synthetic.SyntheticIdentities`` built with the *training run's*
    settings (``pm_dist.evaluate.synthetic_dataset``), so training and the command line see the
    same held-out images."""

    dataset: Any
    pairs: int = 600
    identities: int = 200
    seed: int = 0

    def run(self, model, ctx):
        return evaluate_synthetic(model, self.dataset, self.pairs, self.identities, seed=self.seed,
                                  batch_size=ctx.batch_size, device=ctx.device, flip=ctx.flip,
                                  tar_method=ctx.tar_method)


def parse_suite(entry: dict, path: str = "eval.suites") -> Suite:
    """A suite from a config entry ``{name: <registered>, option: value, ...}``; errors name the key."""
    from pm_dist.config_io import ConfigError, from_dict

    if not isinstance(entry, dict) or "name" not in entry:
        raise ConfigError(f"{path}: each suite is a mapping with a 'name' key, got {entry!r}")
    options = {k: v for k, v in entry.items() if k != "name"}
    try:
        cls = suite_class(entry["name"])
    except ValueError as err:
        raise ConfigError(f"{path}.name: {err}") from None
    return from_dict(cls, options, f"{path}[{entry['name']}]")
