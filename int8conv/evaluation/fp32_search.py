"""Which layers to keep in FP32 so that the output cosine reaches a target: the search both backends share.

Each quantized layer's harm is measured alone: the model with ONLY that layer quantized is scored (errors of
different layers then do not mask each other, as they would when dropping one layer from an all-INT8 model).
Layers go to FP32 most harmful first; the shortest such prefix that reaches the target is found by doubling,
then bisecting, the prefix length (about 2 log2(n) more runs after the n sensitivity runs). Harms do not add up
exactly (errors of two layers can cancel, or one hides behind another), so the prefix may hold layers the target
does not need: each is then tried back in INT8, least harmful first, and stays INT8 when the target still holds
(one run per layer of the prefix).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from int8conv.errors import Int8ConvError
from int8conv.evaluation.metrics import worst_first
from int8conv.progress import progress

log = logging.getLogger(__name__)


@dataclass
class Fp32Choice:
    """The layers kept FP32 and the cosines that justified them."""

    fp32_layers: list[str]
    cosine_all_int8: float
    cosine: float
    target: float
    sensitivity: dict[str, float] = field(default_factory=dict)
    #: layers of the searched prefix that the final pass returned to INT8 (the target held without them)
    returned: list[str] = field(default_factory=list)

    @property
    def reached(self) -> bool:
        return self.cosine >= self.target


def search_fp32_layers(layers: Sequence[str], score: Callable[[list[str]], float], target: float) -> Fp32Choice:
    """``score(fp32_layers)`` is the output cosine of the model with those layers FP32 and the rest INT8."""
    if not 0 < target <= 1:
        raise Int8ConvError(f"--auto-fp32 {target}: the target output cosine must be in (0, 1]")
    layers = list(layers)
    results: dict[int, float] = {}
    full = score([])
    log.info("all %d layers INT8: output cosine %.6f (target %g)", len(layers), full, target)
    if full >= target or not layers:
        return Fp32Choice([], full, full, target)
    sensitivity = {}
    for name in progress(layers, desc="layer sensitivity", unit="layer"):
        sensitivity[name] = score([other for other in layers if other != name])
    ranked = sorted(layers, key=lambda name: worst_first(sensitivity[name]))
    results[0] = full

    def with_fp32(count: int) -> float:
        if count not in results:
            results[count] = score(ranked[:count])
            log.info("%d most sensitive layer(s) in FP32: output cosine %.6f", count, results[count])
        return results[count]

    low, high = 0, 1
    while high < len(ranked) and with_fp32(high) < target:
        low, high = high, min(2 * high, len(ranked))
    if with_fp32(high) >= target:
        while high - low > 1:
            middle = (low + high) // 2
            if with_fp32(middle) >= target:
                high = middle
            else:
                low = middle
    else:  # out of reach (fp16 storage or the FP32 parts alone cost that much): keep the best prefix measured
        high = min(results, key=lambda count: (-worst_first(results[count]), count))
        log.warning(
            "output cosine %g is out of reach (%.6f with every layer FP32); keeping the best measured "
            "choice: %d layer(s) FP32, cosine %.6f",
            target,
            results[len(ranked)],
            high,
            results[high],
        )
        return Fp32Choice(ranked[:high], full, results[high], target, sensitivity)
    chosen, cosine = _prune(ranked[:high], results[high], score, target)
    return Fp32Choice(chosen, full, cosine, target, sensitivity, [name for name in ranked[:high] if name not in chosen])


def _prune(
    fp32_layers: list[str], cosine: float, score: Callable[[list[str]], float], target: float
) -> tuple[list[str], float]:
    """Return layers of a choice that reaches ``target`` to INT8 while it still does, least harmful first.

    The prefix's last layer is not tried: the prefix without it was measured below the target."""
    chosen = list(fp32_layers)
    for name in reversed(fp32_layers[:-1]):
        trial = [other for other in chosen if other != name]
        trial_cosine = score(trial)
        if trial_cosine >= target:
            log.info("%s back in INT8: output cosine %.6f still reaches %g", name, trial_cosine, target)
            chosen, cosine = trial, trial_cosine
    return chosen, cosine
