"""The order a grid's trials start in: the longest first, by their architectures' profiles.

With trials started in the study file's order, the last one to start may be a long one, left
training alone while the other slots sit idle (on 2 slots, up to a whole trial of the wall).
Starting the longest first (the longest-processing-time rule) leaves the short ones for the end,
where they fill the slots evenly. The order changes no trial's result: each trains from its
own seed's random streams, whatever ran before or beside it. Under ASHA it would change
which trials are pruned (a rung's cut-off is drawn from the trials that reached it first, so
the costliest architectures would set it), and pruned trials end far shorter than their
length: a study with a scheduler keeps its own order.
"""

from __future__ import annotations

from typing import Any

from ablate.tune.precision_plan import train_images


def start_order(study: Any, trials: list[Any], profiles: dict[str, dict[str, Any]]
                ) -> list[Any]:
    """The order a grid starts `trials` in: `longest_first`, or the study's own with a
    scheduler (ASHA)."""
    if study.spec.scheduler.name != "fifo":
        return list(trials)
    return longest_first(trials, profiles)


def longest_first(trials: list[Any], profiles: dict[str, dict[str, Any]]) -> list[Any]:
    """`trials` with the longest to train first: a trial's length is `train_images` over its
    profile's `train_img_s` (timed alone at the trials' batch and threads; `profiles` by
    trial id, as `profile_trials` gives them). Trials without a profile, or on an image folder
    beside data of known size, go first, in their order (their length is unknown, so they
    may be the longest); ties keep the study's order, so the seeds of one configuration stay
    together. Without any profile: the study's order."""
    def speed(t: Any) -> float | None:
        v = ((profiles.get(t.trial_id) or {}).get("metrics") or {}).get("train_img_s")
        return float(v) if v and v > 0 else None

    # an image folder's size is unknown: where every trial reads one, the other factors set
    # the order (its size counts as 1); beside data of known size, its trials' length is unknown
    images = {t.trial_id: train_images(t) for t in trials}
    if all(n is None for n in images.values()):
        images = {t.trial_id: train_images(t, unknown=1.0) for t in trials}
    length = {}
    for t in trials:
        s, n = speed(t), images[t.trial_id]
        if s is not None and n is not None:
            length[t.trial_id] = n / s
    if not length:
        return list(trials)
    return sorted(trials, key=lambda t: (t.trial_id in length, -length.get(t.trial_id, 0.0)))
