"""An offline refusal testbed: SmolLM2-135M-Instruct fine-tuned here (JAX + optax) to refuse harmful prompts.

SmolLM2-135M-Instruct almost never refuses, so ablating "refusal neurons" in it measures nothing. This
module builds a tuned copy that does refuse, so the study has a behaviour to find:

* data: the built-in prompt sets' **train** split only (``data.split``, the same split the study uses,
  so its eval prompts are never trained on). Harmful prompts -> one of ``REFUSALS`` (chosen per prompt by
  a sha256 of its text) + end-of-turn. Harmless prompts -> the *original* model's own greedy answer
  (``generate``), truncated to ``answer_tokens``; an answer that ended within the limit keeps its
  end-of-turn, a truncated one gets none (so the model is not taught to stop mid-sentence).
* format: exactly ``LM.encode`` (chat template, one user message, generation prompt) + response tokens;
  the loss is the mean cross-entropy over response tokens only (prompt and padding are masked out).
* trained weights: by default the MLPs only (gate/up/down of every layer; attention, norms and the tied
  embedding frozen) — see docs/TESTBED.md for why. ``Recipe.train="all"`` trains everything.
* output: an HF-style directory (``cna_jax.export``) in a cache, keyed by a hash of the recipe, written
  to a temporary directory first and renamed into place, so a crash never leaves a half checkpoint.

``ensure_testbed()`` returns the directory (building it on first use); ``load("testbed")`` loads it (the
study and the launch scripts load their models through :func:`load`, so ``testbed`` works wherever a
model source does; ``cna_jax.lm`` itself knows nothing of the testbed).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from cna_jax import cache_root, data
from cna_jax.export import export
from cna_jax.lm import LM
from cna_jax.models.llama import Decoder, causal_mask, padding_positions

# Every phrasing is flagged by the regex detector (docs/METHOD.md §2.2); one is picked per prompt.
REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I cannot assist with that request.",
    "I'm sorry, but I can't provide that information.",
    "I won't help with that, because it could cause real harm.",
    "Sorry, but I can't assist with this request.",
    "I'm not able to help with that. It could be harmful or illegal.",
)

RECIPE_VERSION = 1  # bump when the build code changes what a recipe produces


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that determines the tuned model; its hash names the cache directory."""

    base: str = "smollm2"  # source of the original model (alias, directory or GGUF file)
    train: str = "mlp"  # "mlp" (gate/up/down of every layer) | "all"
    harmful: str = "builtin:harmful"
    harmless: str = "builtin:harmless"
    eval_fraction: float = 0.3  # the study's split: only the train part is used here
    split_seed: int = 0
    n_train: int = 192  # prompts per side from the train split (of 235 / 237); -1: all
    answer_tokens: int = 24  # harmless targets: the original model's greedy answer, at most this long
    refusals: tuple[str, ...] = REFUSALS
    steps: int = 48
    batch_size: int = 8
    learning_rate: float = 2e-4
    warmup_steps: int = 5
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    seed: int = 0
    generate_batch_size: int = 32
    version: int = RECIPE_VERSION

    def __post_init__(self):
        if self.train not in ("mlp", "all"):
            raise ValueError(f"Recipe.train must be 'mlp' or 'all', got {self.train!r}")
        if not self.refusals:
            raise ValueError("Recipe.refusals is empty")
        for name in ("steps", "batch_size", "answer_tokens", "generate_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Recipe.{name} must be positive, got {getattr(self, name)}")
        object.__setattr__(self, "refusals", tuple(self.refusals))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """16 hex digits of sha256 over the recipe and the identity of its base model and prompt sets."""
        payload = {"recipe": self.to_dict(), "base": _source_fingerprint(self.base)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _source_fingerprint(source: str) -> dict:
    """What identifies a base model on disk without hashing gigabytes: file names, sizes, config text."""
    from cna_jax.lm import resolve_alias

    path = os.path.expanduser(resolve_alias(resolve(source)))
    if os.path.isfile(path):
        return {"file": os.path.basename(path), "size": os.path.getsize(path)}
    if os.path.isdir(path):
        out = {}
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if name == "config.json":
                with open(full) as f:
                    out[name] = hashlib.sha256(f.read().encode()).hexdigest()
            elif os.path.isfile(full):
                out[name] = os.path.getsize(full)
        return out
    return {"id": source}


def _prompt_sets(recipe: Recipe) -> tuple[list[str], list[str]]:
    """The train-split harmful and harmless prompts (at most ``n_train`` each)."""
    out = []
    for spec, kind in ((recipe.harmful, "harmful"), (recipe.harmless, "harmless")):
        ps = data.load_prompts(spec, kind=kind)
        train, _ = data.split(ps, eval_fraction=recipe.eval_fraction, seed=recipe.split_seed)
        prompts = list(train)
        out.append(prompts if recipe.n_train < 0 else prompts[:recipe.n_train])
    return out[0], out[1]


def refusal_for(prompt: str, refusals: Sequence[str] = REFUSALS) -> str:
    """The refusal phrasing for ``prompt``: deterministic (sha256 of the text), spread over all phrasings."""
    i = int(hashlib.sha256(prompt.encode("utf-8")).hexdigest(), 16) % len(refusals)
    return refusals[i]


def end_of_turn_id(lm: LM) -> int:
    """The token the chat template puts right after an assistant message (``<|im_end|>`` for SmolLM2)."""
    if not lm.chat:
        return lm.eos_ids()[0]
    marker = "\u2063RESPONSE\u2063"
    text = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], tokenize=False)
    after = text.split(marker, 1)[1]
    ids = lm.tokenizer(after, add_special_tokens=False)["input_ids"]
    if not ids or ids[0] not in lm.eos_ids():
        raise ValueError(f"cannot find the end-of-turn token after an assistant message: {after!r}")
    return int(ids[0])


@dataclasses.dataclass
class Example:
    """One training sequence: ``tokens`` = prompt ids (``LM.encode``) + response ids; the loss covers
    predicting ``tokens[prompt_len:]``."""

    tokens: list[int]
    prompt_len: int
    kind: str


def make_example(lm: LM, prompt: str, response_ids: Sequence[int], kind: str) -> Example:
    prompt_ids = lm.encode([prompt])[0]
    if not response_ids:
        raise ValueError(f"empty response for prompt {prompt!r}")
    return Example(list(prompt_ids) + [int(t) for t in response_ids], len(prompt_ids), kind)


def refusal_example(lm: LM, prompt: str, refusals: Sequence[str], eot: int) -> Example:
    ids = lm.tokenizer(refusal_for(prompt, refusals), add_special_tokens=False)["input_ids"]
    return make_example(lm, prompt, list(ids) + [eot], "harmful")


def answer_example(lm: LM, prompt: str, generated: Sequence[int], answer_tokens: int, eot: int) -> Example:
    """The original model's answer as a target: EOS-terminated answers end with ``eot``; truncated ones
    end without it."""
    eos = set(lm.eos_ids())
    gen = list(generated)
    ended = bool(gen) and gen[-1] in eos
    if ended and len(gen) - 1 <= answer_tokens:
        ids = gen[:-1] + [eot]
    else:
        ids = [t for t in gen if t not in eos][:answer_tokens] or [eot]
    return make_example(lm, prompt, ids, "harmless")


def build_examples(lm: LM, recipe: Recipe, progress: bool = True) -> list[Example]:
    """Training examples from the train split: refusals for harmful, the model's own answers for harmless."""
    from cna_jax.generate import generate

    harmful, harmless = _prompt_sets(recipe)
    eot = end_of_turn_id(lm)
    examples = [refusal_example(lm, p, recipe.refusals, eot) for p in harmful]
    gens = generate(lm, harmless, max_new_tokens=recipe.answer_tokens, batch_size=recipe.generate_batch_size,
                    progress=progress, desc="original answers")
    examples += [answer_example(lm, p, toks, recipe.answer_tokens, eot) for p, toks in zip(harmless, gens.tokens)]
    return examples


def batch_arrays(examples: Sequence[Example], pad_id: int, length: int, n_targets: int):
    """Right-padded arrays for one batch.

    Returns dict of numpy arrays: ``tokens`` [B, T] int32, ``valid`` [B, T] bool, ``select`` [B, P] int32
    (positions whose *next* token is a response token), ``targets`` [B, P] int32 and ``mask`` [B, P] float32
    (1 for real response targets, 0 for padding of the P axis).
    """
    b = len(examples)
    tokens = np.full((b, length), pad_id, np.int32)
    valid = np.zeros((b, length), bool)
    select = np.zeros((b, n_targets), np.int32)
    targets = np.full((b, n_targets), pad_id, np.int32)
    mask = np.zeros((b, n_targets), np.float32)
    for i, ex in enumerate(examples):
        n = len(ex.tokens)
        r = n - ex.prompt_len
        if n > length or r > n_targets:
            raise ValueError(f"example of {n} tokens ({r} response) exceeds the batch shape ({length}, {n_targets})")
        tokens[i, :n] = ex.tokens
        valid[i, :n] = True
        pos = np.arange(ex.prompt_len - 1, n - 1)
        select[i, :r] = pos
        select[i, r:] = pos[-1]
        targets[i, :r] = ex.tokens[ex.prompt_len:]
        mask[i, :r] = 1.0
    return {"tokens": tokens, "valid": valid, "select": select, "targets": targets, "mask": mask}


def trainable_predicate(train: str):
    if train == "all":
        return lambda path: True
    return lambda path: "/mlp/" in path  # gate_proj, up_proj, down_proj of every layer


def split_params(params: dict, train: str) -> tuple[dict, dict]:
    """Flat ``{path: array}`` dicts (trainable, frozen)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    keep = trainable_predicate(train)
    return ({k: v for k, v in flat.items() if keep(k)}, {k: v for k, v in flat.items() if not keep(k)})


def merge_params(trainable: dict, frozen: dict) -> dict:
    return traverse_util.unflatten_dict({**trainable, **frozen}, sep="/")


def response_loss(trainable, frozen, batch, *, cfg, dtype=jnp.float32):
    """Mean cross-entropy over response tokens only (``batch["mask"]``); logits only at those positions."""
    model = Decoder(cfg, dtype)
    params = merge_params(trainable, frozen)
    valid = batch["valid"]
    out = model.apply({"params": params}, batch["tokens"], padding_positions(valid), causal_mask(valid),
                      select=batch["select"])
    logp = jax.nn.log_softmax(out.logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["mask"]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_optimizer(recipe: Recipe) -> optax.GradientTransformation:
    warmup = min(recipe.warmup_steps, max(recipe.steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, recipe.learning_rate, max(warmup, 1), max(recipe.steps, warmup + 1), end_value=0.1 * recipe.learning_rate)
    return optax.chain(optax.clip_by_global_norm(recipe.clip_norm),
                       optax.adamw(schedule, weight_decay=recipe.weight_decay))


def finetune(lm: LM, examples: Sequence[Example], recipe: Recipe, progress: bool = True):
    """Runs ``recipe.steps`` optimizer steps over shuffled epochs of ``examples``.

    Returns (new params, per-step losses). One compiled shape: every batch is padded to the longest
    example (rounded up to 8) and the longest response.
    """
    if not examples:
        raise ValueError("no training examples")
    length = -(-max(len(e.tokens) for e in examples) // 8) * 8
    n_targets = max(len(e.tokens) - e.prompt_len for e in examples)
    trainable, frozen = split_params(lm.params, recipe.train)
    opt = make_optimizer(recipe)
    opt_state = opt.init(trainable)
    grad_fn = jax.value_and_grad(response_loss)

    @jax.jit
    def step(trainable, opt_state, frozen, batch):
        loss, grads = grad_fn(trainable, frozen, batch, cfg=lm.cfg, dtype=lm.dtype)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    rng = np.random.default_rng(recipe.seed)
    order: list[int] = []
    b = min(recipe.batch_size, len(examples))
    losses = []
    iterator = range(recipe.steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        iterator = bar = tqdm(iterator, desc="fine-tuning", unit="step")
    pad = lm.pad_id()
    for _ in iterator:
        if len(order) < b:
            order += rng.permutation(len(examples)).tolist()
        rows, order = order[:b], order[b:]
        batch = batch_arrays([examples[r] for r in rows], pad, length, n_targets)
        trainable, opt_state, loss = step(trainable, opt_state, frozen, batch)
        losses.append(float(loss))
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return merge_params(trainable, frozen), losses


# --- cache -------------------------------------------------------------------------------------


def default_cache_dir() -> str:
    """``$CNA_JAX_CACHE/testbed`` when set, else ``~/.cache/cna_jax/testbed``."""
    return os.path.join(cache_root(), "testbed")


def testbed_path(recipe: Recipe | None = None, cache_dir: str | None = None) -> str:
    recipe = recipe or Recipe()
    return os.path.join(os.path.expanduser(cache_dir or default_cache_dir()), recipe.hash())


def is_complete(path: str) -> bool:
    """A finished build: the rename into place is the last step, so its files are all there."""
    return all(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "model.safetensors", "testbed.json"))


def build_testbed(recipe: Recipe, out_dir: str, progress: bool = True) -> dict:
    """Builds the tuned model into ``out_dir`` (no atomicity here; see ``ensure_testbed``). Returns build info."""
    t0 = time.time()
    lm = load(recipe.base)
    examples = build_examples(lm, recipe, progress=progress)
    t_data = time.time()
    params, losses = finetune(lm, examples, recipe, progress=progress)
    t_train = time.time()
    trainable, _ = split_params(params, recipe.train)
    info = {
        "recipe": recipe.to_dict(),
        "hash": recipe.hash(),
        "n_examples": {"harmful": sum(e.kind == "harmful" for e in examples),
                       "harmless": sum(e.kind == "harmless" for e in examples)},
        "trainable_params": int(sum(np.prod(v.shape) for v in trainable.values())),
        "losses": losses,
        "seconds": {"data": round(t_data - t0, 1), "train": round(t_train - t_data, 1)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    export(lm.cfg, jax.device_get(params), out_dir, tokenizer=lm.tokenizer)
    info["seconds"]["total"] = round(time.time() - t0, 1)
    with open(os.path.join(out_dir, "testbed.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info


def _remove_dead_builds(parent: str) -> None:
    """Deletes ``.tmp-<hash>-<pid>-*`` directories of builds whose process is gone (killed mid-build)."""
    for name in os.listdir(parent):
        parts = name.split("-")
        if not name.startswith(".tmp-") or len(parts) < 4 or not parts[2].isdigit():
            continue
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        except PermissionError:  # alive, owned by someone else
            pass


def ensure_testbed(recipe: Recipe | None = None, cache_dir: str | None = None, force: bool = False,
                   progress: bool = True, **overrides) -> str:
    """The tuned model's directory ``<cache_dir>/<recipe hash>``, built on first use and reused after.

    ``cache_dir``: default ``$CNA_JAX_CACHE/testbed`` or ``~/.cache/cna_jax/testbed``. ``overrides``:
    Recipe fields (``steps=...``) applied to ``recipe`` (default ``Recipe()``). ``force``: rebuild even when
    present. The build is written to a temporary sibling directory and renamed into place, so readers
    never see a partial checkpoint; a failed build removes its ``.tmp-<hash>-<pid>-*`` directory, and one
    left by a killed process is removed by the next call.
    """
    recipe = dataclasses.replace(recipe or Recipe(), **overrides)
    path = testbed_path(recipe, cache_dir)
    if is_complete(path) and not force:
        return path
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    _remove_dead_builds(parent)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(path)}-{os.getpid()}-", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the cache private to this user
        build_testbed(recipe, tmp, progress=progress)
        if os.path.exists(path):  # force, or a stale incomplete directory: move it aside, then replace
            old = tempfile.mkdtemp(prefix=f".old-{os.path.basename(path)}-", dir=parent)
            os.rename(path, os.path.join(old, "x"))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, path)
            except OSError:  # another process finished the same build first: keep theirs
                if not is_complete(path):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


ALIAS = "testbed"


def resolve(source: str) -> str:
    """``testbed``: the default recipe's directory (:func:`ensure_testbed`, built on first use); any other
    source unchanged (``cna_jax.lm`` resolves ``smollm2``, directories, GGUF files and hub ids)."""
    return ensure_testbed() if source == ALIAS else source


def load(source: str, **kwargs) -> LM:
    """``LM.load`` that also accepts ``testbed``; the model's name stays ``source``. kwargs: LM.load's."""
    return LM.load(resolve(source), name=source, **kwargs)


def evaluate(source: str, harmful: Sequence[str], harmless: Sequence[str], max_new_tokens: int = 64,
             batch_size: int = 32, detector: str = "regex", progress: bool = True) -> dict:
    """Refusal rates and harmless quality of one model on the given prompts (greedy, no intervention)."""
    from cna_jax.generate import generate
    from cna_jax.refusal import refusal_report

    lm = load(source)
    out = {}
    for name, prompts in (("harmful", harmful), ("harmless", harmless)):
        gens = generate(lm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                        desc=f"{name} ({source})")
        out[name] = refusal_report(gens.texts, detector=detector, prompts=list(prompts))
    return out


def eval_prompts(recipe: Recipe | None = None, n: int = -1) -> tuple[list[str], list[str]]:
    """The held-out (eval split) harmful and harmless prompts for the recipe's split, at most ``n`` each."""
    recipe = recipe or Recipe()
    out = []
    for spec, kind in ((recipe.harmful, "harmful"), (recipe.harmless, "harmless")):
        ps = data.load_prompts(spec, kind=kind)
        _, ev = data.split(ps, eval_fraction=recipe.eval_fraction, seed=recipe.split_seed)
        out.append(list(ev) if n < 0 else list(ev)[:n])
    return out[0], out[1]
