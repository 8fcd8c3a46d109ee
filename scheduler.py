"""Dynamic task scheduling for multi-task learning: a discounted UCB bandit that picks the next task.

Paper map (MTOP, section 3.2 and Algorithm 1; Eq. (3) is the textbook UCB rule that Eq. (6) adapts):
    Eq. (4) reward update, every I steps         -> DynamicTaskScheduler.update
    Eq. (5) discounted count, every step         -> DynamicTaskScheduler.choose
    Eq. (6) task choice, size-weighted bonus     -> DynamicTaskScheduler.scores / choose
    Eq. (7) alpha annealed over epochs           -> annealed_alpha, via set_epoch
    Algorithm 1, gamma_q = gamma ** I            -> DynamicTaskScheduler.__init__
    Fig. 3(a) 'Metric Diff' / '(1-Metric)'       -> reward="diff" / reward="gap"
    Fig. 3(a) 'Independent' / 'Weighted'         -> share="independent" / share="weighted"
    'w/o DTS' (sampling proportional to size)    -> make_sampler("proportional", ...)

Shapes: none; everything is a Python float per task, N = number of tasks.
Standard library only, so this file can be copied into any project. `python scheduler.py` runs a demo.

References:
    Anonymous (ACL submission). All Birds with One Stone: Multi-task Learning for Inference with One
        Forward Pass (MTOP), section 3.2.
    Sharma and Ravindran 2017. Online multi-task learning using active sampling. ICLR.
    Stickland and Murray 2019. BERT and PALs, section 4 (annealed sampling). ICML.
    Auer, Cesa-Bianchi and Fischer 2002. Finite-time analysis of the multiarmed bandit problem (UCB1).
"""

import math
import numbers
import random
from typing import Any

REWARDS = ("diff", "gap")
SHARES = ("independent", "weighted")
SAMPLERS = ("dts", "proportional", "uniform", "annealed", "temperature")


def annealed_alpha(epoch: int, total_epochs: int) -> float:
    """Eq. (7): alpha goes linearly from 1 at the first epoch to 0.2 at the last; epochs count from 1."""
    if total_epochs < 1 or not 1 <= epoch <= total_epochs:
        raise ValueError(f"epoch must be in 1..total_epochs, got epoch={epoch}, total_epochs={total_epochs}")
    if total_epochs == 1:
        return 1.0  # one epoch is both first and last; keep the first epoch's value instead of 0 / 0
    return 1.0 - 0.8 * (epoch - 1) / (total_epochs - 1)  # Eq. (7)


class DynamicTaskScheduler:
    """Discounted UCB over tasks (MTOP Algorithm 1): Q from metric gains, n from discounted step counts.

    Where each equation lives (the line carries the same `# Eq. (n)`):
        Eq. (4)  Q_t(a) = (gamma_q Q_{t-I}(a) + (m_t(a) - m_{t-I}(a))) / n_t(a)            update()
        Eq. (5)  n_t(a) = gamma n_{t-1}(a) + 1(a = A_t)                                    choose()
        Eq. (6)  A_t = argmax_a Q_t(a) + c sqrt(log(sum_a n_t(a)) / n_t(a) * w(a)^alpha)   scores()
        Eq. (7)  alpha = 1 - 0.8 (e - 1) / (E - 1)                                          set_epoch()

    The four reward options of Fig. 3(a), exactly as computed in update():
        reward="diff":  r(a) = m_t(a) - m_{t-I}(a), the paper's choice.
        reward="gap":   r(a) = 1 - m_t(a), the gap to a target of 1 (Sharma and Ravindran's rule).
        share="independent": Q_t(a) = (gamma_q Q_{t-I}(a) + r(a)) / max(n_t(a), 1), as in Eq. (4).
        share="weighted": compute those per-task Q, add them up, and give task a the fraction w(a) / sum w
                          of the total (raw sizes, not w^alpha); the next update discounts that share.

    Decisions on what the paper leaves open:
        - n_t(a) = 0 (never chosen) makes Eq. (6) divide by zero: such a task scores +inf, so every task is
          tried once first, as in UCB1.
        - log(sum n) is negative or zero for the first steps (sum n < 1): we take log(max(sum n, e)) >= 1,
          which is exactly the paper's term from the fourth step on when gamma >= 0.91.
        - Eq. (4) divides by n_t(a), and a task left alone for one interval has n = 0.99**1000 = 4e-5 of its
          old count: dividing by that would blow a little metric noise up 20,000 times. We divide by
          max(n, 1), one step's worth, so |Q| never exceeds |gamma_q Q_{t-I} + reward| itself.
        - w(a) is the raw number of training examples, as the paper writes. Rescaling w cannot change the
          choice frequencies when Q is equal for all tasks (a common factor cancels in the argmax), but it
          sets the exploration scale against Q: in steady state every task's bonus is about
          c sqrt(log(S) W / S), with S = 1 / (1 - gamma) and W = sum_a w(a)^alpha. On GLUE (W ~ 950,000
          at alpha = 1) the paper's c = 2e-5 gives ~4e-3, the size of Q (a gain of 0.01 to 0.1 over n of 1
          to 40), so both terms count; with w as fractions of 1 the bonus would be ~4e-6 and c would do
          nothing, against the paper's sweep over c (Fig. 3b, 3c). Fractions need c times sqrt(sum w).
        - Equal scores: the larger task wins; equal sizes too: a random.Random(seed) draw (reproducible).
        - The first update() (before training) only stores m_0, as Algorithm 1 skips Eq. (4) at j = 0;
          gamma_q = gamma ** interval assumes update() is called every `interval` choices.

    NOTE: with equal Q, n(a) settles proportional to w(a)^alpha, so shares follow w(a)^alpha, but small
    shares come out larger than that. n is a discounted count whose total is capped near S = 1/(1-gamma)
    (100 for gamma = 0.99), a task is chosen whenever its n falls to its target p S, and each choice adds
    a whole 1. Its share is then ln(1/gamma) / ln(1 + 1/(p S)) ~ p + (1 - gamma)/2 rather than p: +7.5%
    relative at p = 7% with gamma = 0.99, and RTE's 0.26% of GLUE comes out near 0.6%.
    """

    def __init__(self, task_sizes: dict[str, float], interval: int = 1000, gamma: float = 0.99,
                 c: float = 2e-5, reward: str = "diff", share: str = "independent", seed: int = 0,
                 alpha: float | None = None):
        self.task_sizes = _checked_sizes(task_sizes)
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be a whole number of steps >= 1, got {interval!r}")
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
        if not (math.isfinite(c) and c >= 0):
            raise ValueError(f"c (exploration weight) must be a finite number >= 0, got {c!r}")
        if reward not in REWARDS:
            raise ValueError(f"unknown reward {reward!r}: choose one of {REWARDS}")
        if share not in SHARES:
            raise ValueError(f"unknown share {share!r}: choose one of {SHARES}")
        if alpha is not None and not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number or None (annealed by set_epoch), got {alpha!r}")
        self.interval, self.gamma, self.c, self.reward, self.share = interval, gamma, c, reward, share
        self.fixed_alpha = alpha
        self.alpha = 1.0 if alpha is None else float(alpha)  # without set_epoch: size-proportional
        self.gamma_q = gamma ** interval  # Algorithm 1 line 5: Q loses per interval what n loses per step
        self.q_values = dict.fromkeys(self.task_sizes, 0.0)  # Q_0(a) = 0
        self.discounted_counts = dict.fromkeys(self.task_sizes, 0.0)  # n_0(a) = 0
        self.previous_metrics: dict[str, float] | None = None  # m_{t-I}(a); None before the first probe
        self.steps = 0
        self.rng = random.Random(seed)  # only breaks exact ties between tasks of equal size

    def scores(self) -> dict[str, float]:
        """Eq. (6)'s bracket for every task: exploitation Q plus the size-weighted exploration bonus."""
        log_total = math.log(max(sum(self.discounted_counts.values()), math.e))  # >= 1, see the docstring
        scores = {}
        for task, n in self.discounted_counts.items():
            if n == 0.0:
                scores[task] = math.inf  # never chosen (or decayed to nothing): try it first, as UCB1 does
                continue
            # c == 0 skips the bonus so that 0 * inf cannot turn into NaN for a long-neglected task
            bonus = self.c * math.sqrt(log_total / n * self.task_sizes[task] ** self.alpha) if self.c else 0.0
            scores[task] = self.q_values[task] + bonus  # Eq. (6)
        return scores

    def choose(self) -> str:
        """Return the task for the next training step (Eq. 6), then discount every task's count (Eq. 5)."""
        scores = self.scores()
        best = max(scores.values())
        tied = [task for task, score in scores.items() if score == best]
        largest = max(self.task_sizes[task] for task in tied)
        tied = [task for task in tied if self.task_sizes[task] == largest]
        chosen = tied[0] if len(tied) == 1 else self.rng.choice(tied)
        for task, n in self.discounted_counts.items():
            self.discounted_counts[task] = self.gamma * n + (1.0 if task == chosen else 0.0)  # Eq. (5)
        self.steps += 1
        return chosen

    def update(self, metrics: dict[str, float]) -> None:
        """Take every task's probed metric (0..1 scale); the first call stores m_0, later calls apply
        Eq. (4)."""
        metrics = _checked_metrics(metrics, self.task_sizes)
        if self.previous_metrics is None:
            self.previous_metrics = metrics
            return
        q_values = {}
        for task, metric in metrics.items():
            if self.reward == "diff":
                gain = metric - self.previous_metrics[task]  # progress over the last I steps
            else:
                gain = 1.0 - metric  # distance to a perfect score, the target-gap reward
            n = max(self.discounted_counts[task], 1.0)  # floor at one step, see the class docstring
            q_values[task] = (self.gamma_q * self.q_values[task] + gain) / n  # Eq. (4)
        if self.share == "weighted":
            total_q, total_size = sum(q_values.values()), sum(self.task_sizes.values())
            q_values = {task: total_q * size / total_size for task, size in self.task_sizes.items()}
        self.q_values, self.previous_metrics = q_values, metrics

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        """Set alpha by Eq. (7) for this epoch (1-based); a fixed alpha given to __init__ stays as it is."""
        alpha = annealed_alpha(epoch, total_epochs)
        if self.fixed_alpha is None:
            self.alpha = alpha

    def config(self) -> dict[str, Any]:
        """The settings a saved state must match: resuming under other settings is a different run."""
        return {"task_sizes": dict(self.task_sizes), "interval": self.interval, "gamma": self.gamma,
                "c": self.c, "reward": self.reward, "share": self.share, "alpha": self.fixed_alpha}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the same sequence of choices; json.dumps-safe."""
        return {"sampler": "dts", "config": self.config(), "alpha": self.alpha, "steps": self.steps,
                "q_values": dict(self.q_values), "discounted_counts": dict(self.discounted_counts),
                "previous_metrics": None if self.previous_metrics is None else dict(self.previous_metrics),
                "rng": _rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict() (possibly after a JSON round trip); settings must match this scheduler's."""
        _check_saved(state, "dts", self.config())
        tasks = self.task_sizes
        alpha, steps = _saved_number(state, "alpha"), _saved_steps(state)
        q_values = {task: _saved_number(state, "q_values", task) for task in tasks}
        counts = {task: _saved_number(state, "discounted_counts", task, most=1e12) for task in tasks}
        previous = None if state.get("previous_metrics") is None else {
            task: _saved_number(state, "previous_metrics", task) for task in tasks}
        _set_rng_state(self.rng, state.get("rng"))
        self.alpha, self.steps, self.q_values, self.discounted_counts = alpha, steps, q_values, counts
        self.previous_metrics = previous


class SizeSampler:
    """Random task sampling with p(a) proportional to w(a) ** exponent: the baselines DTS is compared with.

    exponent 0 is uniform, 1 is proportional to size (the paper's 'w/o DTS'), 1/T is temperature T, and
    anneal=True takes the exponent from Eq. (7) at every set_epoch (Stickland and Murray's annealed
    sampling; 1 until set_epoch is called). update() checks the metrics and ignores them, so a training
    loop can treat every sampler alike.
    """

    def __init__(self, task_sizes: dict[str, float], exponent: float = 1.0, anneal: bool = False,
                 seed: int = 0):
        self.task_sizes = _checked_sizes(task_sizes)
        if not math.isfinite(exponent):
            raise ValueError(f"exponent must be a finite number, got {exponent!r}")
        self.fixed_exponent, self.anneal = float(exponent), anneal
        self.exponent = 1.0 if anneal else float(exponent)
        self.steps = 0
        self.rng = random.Random(seed)

    def probabilities(self) -> dict[str, float]:
        """p(a) = w(a)^exponent / sum_b w(b)^exponent."""
        weights = {task: size ** self.exponent for task, size in self.task_sizes.items()}
        total = sum(weights.values())
        return {task: weight / total for task, weight in weights.items()}

    def choose(self) -> str:
        """Draw the task for the next training step."""
        probabilities = self.probabilities()
        self.steps += 1
        return self.rng.choices(list(probabilities), weights=list(probabilities.values()))[0]

    def update(self, metrics: dict[str, float]) -> None:
        """Check the metrics like DynamicTaskScheduler does; a fixed sampler does not use them."""
        _checked_metrics(metrics, self.task_sizes)

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        """With anneal=True the exponent becomes Eq. (7)'s alpha; otherwise only the arguments are checked."""
        alpha = annealed_alpha(epoch, total_epochs)
        if self.anneal:
            self.exponent = alpha

    def config(self) -> dict[str, Any]:
        """The settings a saved state must match."""
        return {"task_sizes": dict(self.task_sizes), "exponent": self.fixed_exponent, "anneal": self.anneal}

    def state_dict(self) -> dict[str, Any]:
        """The exponent in use and the random generator, json.dumps-safe."""
        return {"sampler": "size", "config": self.config(), "exponent": self.exponent, "steps": self.steps,
                "rng": _rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict() (possibly after a JSON round trip); settings must match."""
        _check_saved(state, "size", self.config())
        exponent, steps = _saved_number(state, "exponent"), _saved_steps(state)
        _set_rng_state(self.rng, state.get("rng"))
        self.exponent, self.steps = exponent, steps


def make_sampler(name: str, task_sizes: dict[str, float],
                 **options: Any) -> DynamicTaskScheduler | SizeSampler:
    """Build a sampler by name: "dts" takes DynamicTaskScheduler's options; the others take seed, and
    "temperature" also takes temperature (T, default 2.0, p proportional to size ** (1/T))."""
    if name == "dts":
        return DynamicTaskScheduler(task_sizes, **options)
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: choose one of {SAMPLERS}")
    seed = options.pop("seed", 0)
    temperature = options.pop("temperature", 2.0) if name == "temperature" else 1.0
    if options:
        raise ValueError(f"sampler {name!r} does not take option(s) {sorted(options)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    exponent = {"proportional": 1.0, "uniform": 0.0, "annealed": 1.0, "temperature": 1.0 / temperature}[name]
    return SizeSampler(task_sizes, exponent=exponent, anneal=name == "annealed", seed=seed)


def _checked_sizes(task_sizes: dict[str, float]) -> dict[str, float]:
    if not task_sizes:
        raise ValueError("task_sizes is empty: give at least one task and its number of training examples")
    for task, size in task_sizes.items():
        if not isinstance(task, str):
            raise ValueError(f"task name {task!r} is not a string: names key metrics and saved states")
        if isinstance(size, bool) or not isinstance(size,
                                                    numbers.Real) or not (math.isfinite(size) and size > 0):
            raise ValueError(f"task {task!r} has size {size!r}: give its number of training examples, > 0")
    return {task: float(size) for task, size in task_sizes.items()}


def _checked_metrics(metrics: dict[str, float], tasks: dict[str, float]) -> dict[str, float]:
    unknown = [task for task in metrics if task not in tasks]
    missing = [task for task in tasks if task not in metrics]
    if unknown:
        raise ValueError(f"metrics for unknown task(s) {unknown}; the tasks are {list(tasks)}")
    if missing:
        raise ValueError(f"metrics are missing task(s) {missing}: probe every task at every update")
    for task in tasks:
        value = metrics[task]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"metric of task {task!r} is {value!r}: metrics must be finite numbers")
    return {task: float(metrics[task]) for task in tasks}  # in task order, so Q updates in a fixed order


def _check_saved(state: dict[str, Any], sampler: str, config: dict[str, Any]) -> None:
    if state.get("sampler") != sampler:
        raise ValueError(f"state is for sampler {state.get('sampler')!r}, not {sampler!r}")
    saved = state.get("config", {})
    differing = [key for key in config if saved.get(key) != config[key]]
    if differing:
        raise ValueError(f"saved settings differ in {differing}: saved {saved}, here {config}")


def _saved_number(state: dict[str, Any], key: str, task: str | None = None,
                  most: float | None = None) -> float:
    """A finite number of a saved state (a task's entry of a per-task table when task is given); with
    `most`, a count: from 0 to most."""
    value = state.get(key)
    if task is not None:
        value = value.get(task) if isinstance(value, dict) else None
    where = key if task is None else f"{key}[{task!r}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"saved state: {where} is {value!r}, not a finite number")
    if most is not None and not 0 <= value <= most:
        raise ValueError(f"saved state: {where} is {value!r}, not a count from 0 to {most:g}")
    return float(value)


def _saved_steps(state: dict[str, Any]) -> int:
    steps = state.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= 10**12:
        raise ValueError(f"saved state: steps is {steps!r}, not a whole number from 0 to 10**12")
    return steps


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss_next = rng.getstate()  # JSON has no tuples: store the 625 ints as a list
    return [version, list(internal), gauss_next]


def _set_rng_state(rng: random.Random, state: list) -> None:
    try:
        version, internal, gauss_next = state
        rng.setstate((version, tuple(internal), gauss_next))
    except (TypeError, ValueError):
        raise ValueError("saved state: rng is not a state of random.Random (from state_dict)") from None


def _demo() -> None:
    """Four toy tasks whose metric rises with the steps they get: how often DTS picks each, and its Q."""
    sizes = {"big": 40_000, "mid": 10_000, "small": 2_500, "tiny": 600}
    # metric = ceiling * (1 - exp(-steps trained / scale)): small tasks learn quickly, then stop gaining
    ceiling = {"big": 0.90, "mid": 0.85, "small": 0.80, "tiny": 0.70}
    scale = {"big": 4_000, "mid": 1_500, "small": 400, "tiny": 150}
    epochs, steps_per_epoch, interval = 5, 2_000, 100
    names = "".join(f"{task:>8}" for task in sizes)

    def probe(trained: dict[str, int]) -> dict[str, float]:
        return {task: ceiling[task] * (1 - math.exp(-trained[task] / scale[task])) for task in sizes}

    def train(sampler: DynamicTaskScheduler | SizeSampler, show: bool) -> dict[str, float]:
        trained = dict.fromkeys(sizes, 0)
        sampler.update(probe(trained))  # m_0, before any training
        for epoch in range(1, epochs + 1):
            sampler.set_epoch(epoch, epochs)
            chosen = dict.fromkeys(sizes, 0)
            for step in range(1, steps_per_epoch + 1):
                task = sampler.choose()
                chosen[task] += 1
                trained[task] += 1
                if step % interval == 0:
                    sampler.update(probe(trained))
            if show:
                shares = "".join(f"{100 * chosen[task] / steps_per_epoch:8.1f}" for task in sizes)
                q_values = "".join(f"{sampler.q_values[task]:8.1e}" for task in sizes)
                print(f"{epoch:>5} {sampler.alpha:>5.2f} |{shares} |{q_values}")
        return probe(trained)

    print(f"DTS on toy tasks (I={interval}, gamma=0.99, c=2e-5): % of each epoch's steps, then Q at its end")
    print(f"{'epoch':>5} {'alpha':>5} |{names} |{names}")
    final = {"dts": train(DynamicTaskScheduler(sizes, interval=interval), show=True)}
    for alpha in (1.0, 0.2):
        total = sum(size ** alpha for size in sizes.values())
        shares = "".join(f"{100 * size ** alpha / total:8.1f}" for size in sizes.values())
        print(f"{'w^a':>5} {alpha:>5.2f} |{shares} |  (the shares that equal Q would give)")
    for name in ("proportional", "annealed"):
        final[name] = train(make_sampler(name, sizes), show=False)
    print(f"\nfinal toy metric  |{names}    mean")
    for name, metrics in final.items():
        values = "".join(f"{value:8.3f}" for value in metrics.values())
        print(f"{name:>17} |{values}{sum(metrics.values()) / len(metrics):8.3f}")


if __name__ == "__main__":
    _demo()
