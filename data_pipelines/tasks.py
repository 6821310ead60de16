"""SeqIO tasks and mixtures for MOSS: pre-training (English, Chinese, code) and SFT.

Nothing is registered at import time: call `register_pretrain_tasks(corpus_dir, vocab_path)`
and `register_sft_tasks(vocab_path, sft_files=..., plugin_files=...)` with local paths (the
embedded corpus from `python -m data_pipelines.corpus`, the vocabulary from
`python -m data_pipelines.vocab`, moss-003-sft-data style JSONL). Task names:

    moss_pretrain_en, moss_pretrain_zh, moss_pretrain_code  -> mixture moss_pretrain
    moss_sft, moss_sft_plugin                               (conversations with loss masks)
    moss_sft_and_plugin                                     (mixture of both, by conversation count)

Every example has `targets` (token ids) and `loss_weights_plus_one` (see
feature_converter.py); `WeightedLMFeatureConverter` packs them into the engine's features.
Pre-training documents are split into chunks of the sequence length (no token is lost) and
mixed by TOKEN share (`token_mixture.py`).
Splits: "train" and "validation". Pre-training text: every `VALIDATION_EVERY`-th document of a
file held out (malformed text lines are errors, never skipped). Conversations and pairs: the
records on physical lines `VALIDATION_EVERY`, 2 x `VALIDATION_EVERY`, ... of each file held
out, so skipping a malformed line moves no other record between the splits.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import seqio
import tensorflow as tf

from data_pipelines import conversation as conv
from data_pipelines.feature_converter import WEIGHTS_FEATURE, add_weights_feature
from data_pipelines.jsonl import DataFormatError, iter_jsonl
from data_pipelines.specials import MAX_QUALITY_TAGS, USER_DEFINED_SYMBOLS
from data_pipelines.token_mixture import DEFAULT_SAMPLE_EXAMPLES, TokenShareMixture, split_targets
from data_pipelines.vocab import load_vocabulary

log = logging.getLogger(__name__)

PRETRAIN_LANGUAGES = ("en", "zh", "code")
# MOSS_SPEC section 4: 360B English, 100B Chinese, 220B code tokens. Token shares: the mixture
# samples examples so that the TOKENS come out in these proportions (token_mixture.py).
DEFAULT_PRETRAIN_RATES = {"en": 360.0, "zh": 100.0, "code": 220.0}
VALIDATION_EVERY = 100
TASK_ID_FEATURE = "task_id"  # kept on unpacked examples so mixtures can be audited
SFT_MIXTURE = "moss_sft_and_plugin"
# Written by the preference-aware `tag` stage next to tags.jsonl (moss_jax/stages/tagging.py).
PREFERENCE_TAGS_FILE = "preference_tags.json"


def _in_split(index: int, split: str) -> bool:
    """Pre-training text: the `index`-th document (0-based) of a file is held out every
    `VALIDATION_EVERY`; moss_jax/eval/bits_per_byte.py reads the held-out documents this way."""
    held_out = index % VALIDATION_EVERY == VALIDATION_EVERY - 1
    return held_out if split == "validation" else not held_out


def _line_in_split(lineno: int, split: str) -> bool:
    """Conversations and pairs: the record on physical line `lineno` (1-based) of its file is
    held out when lineno is a multiple of `VALIDATION_EVERY`; stable whatever is skipped."""
    return _in_split(lineno - 1, split)


# Input errors (a malformed line, a missing file) raised inside the tf.data generators, by
# message: tf.data re-raises them as a tf.errors.OpError whose message embeds the original one
# with a traceback; `input_error` gives back the original so callers see "file:line: ...".
_RAISED: dict[str, type] = {}
_RAISED_LOCK = threading.Lock()
_RAISED_KEEP = 32


def _from_generator(gen: Callable[[], Iterator], output_signature) -> tf.data.Dataset:
    """`tf.data.Dataset.from_generator(gen)`, remembering the input errors (ValueError, OSError)
    `gen` raises so that `input_error` can turn tf.data's wrapped error back into them."""

    def remembering():
        try:
            yield from gen()
        except (ValueError, OSError) as e:
            with _RAISED_LOCK:
                _RAISED.pop(str(e), None)
                _RAISED[str(e)] = type(e)
                while len(_RAISED) > _RAISED_KEEP:
                    del _RAISED[next(iter(_RAISED))]
            raise

    return tf.data.Dataset.from_generator(remembering, output_signature=output_signature)


def input_error(error: tf.errors.OpError) -> Exception | None:
    """The input error (e.g. `DataFormatError` "file:line: ...") that one of this module's
    generators raised and tf.data wrapped into `error`, rebuilt with its own class and message;
    None when `error` carries none."""
    with _RAISED_LOCK:
        for message, cls in reversed(list(_RAISED.items())):
            if message and message in (error.message or ""):
                del _RAISED[message]
                try:
                    return cls(message)
                except Exception:  # a class that cannot be rebuilt from its message alone
                    return ValueError(message)
    return None


class TaskPass(NamedTuple):
    """What one complete pass over a conversation or pair task's split kept and dropped."""

    stats: conv.ConversionStats
    malformed: int
    files: tuple[str, ...]


# (task, split) -> its last complete pass (`task_pass`).
_PASSES: dict[tuple[str, str], TaskPass] = {}


def task_pass(task: str, split: str) -> TaskPass | None:
    """The last complete pass over a conversation or pair task's split (None before one has
    finished)."""
    return _PASSES.get((task, split))


def _text_dataset(path: str, split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # one file per language; example order is shuffled downstream

    def gen():
        for i, (p, lineno, obj) in enumerate(iter_jsonl([path])):
            if not isinstance(obj.get("text"), str):
                raise DataFormatError(f"{p}:{lineno}: no string field 'text'")
            if _in_split(i, split):
                yield {"text": obj["text"]}

    return _from_generator(gen, output_signature={"text": tf.TensorSpec((), tf.string)})


_CJK = re.compile(r"[\u3400-\u9fff]")


def shuffled_units(text: str, rng: random.Random) -> str:
    """The words of `text` (CJK characters one by one, other runs split at whitespace) in a
    random order, spaced as in running text (no space between two CJK characters)."""
    units = re.findall(r"[\u3400-\u9fff]|[^\s\u3400-\u9fff]+", text)
    rng.shuffle(units)
    out: list[str] = []
    for u in units:
        if out and not (_CJK.match(out[-1][-1]) and _CJK.match(u[0])):
            out.append(" ")
        out.append(u)
    return "".join(out)


def _repeat_dataset(
    paths: Sequence[str],
    span_chars: tuple[int, int],
    split: str,
    shuffle_files: bool,
    seed: int | None = None,
    shuffle_units: bool = False,
) -> tf.data.Dataset:
    """Repeated spans of the corpus: `span + "\\n" + span`, one per document (span chosen
    deterministically per document). Predicting the second copy needs in-context copying
    (induction heads), which small models otherwise learn slowly. With `shuffle_units` the
    span's words are put in a random order first (`shuffled_units`): the second copy is then
    predictable only by copying, not from word statistics."""
    del shuffle_files, seed

    def gen():
        lo, hi = span_chars
        for i, (_, _, obj) in enumerate(iter_jsonl(list(paths))):
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str) or len(text) < lo or not _in_split(i, split):
                continue
            rng = random.Random(i)
            n = rng.randint(lo, min(hi, len(text)))
            start = rng.randint(0, len(text) - n)
            span = text[start : start + n]
            if shuffle_units:
                span = shuffled_units(span, rng)
            yield {"text": span + "\n" + span}

    return _from_generator(gen, output_signature={"text": tf.TensorSpec((), tf.string)})


def copy_pieces(vocab_path: str | os.PathLike) -> list[str]:
    """The vocabulary's ordinary pieces as text: no control, unknown, byte or user-defined
    (special token, newline, tab) pieces, none that is only whitespace."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(vocab_path))
    out = []
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i):
            continue
        text = sp.decode([i])
        if text.strip() and text not in USER_DEFINED_SYMBOLS:
            out.append(text)
    return out


def _copy_dataset(
    pieces: Sequence[str], n_pieces: tuple[int, int], split: str, shuffle_files: bool, seed: int | None = None
) -> tf.data.Dataset:
    """Endless `span + "\\n" + span` examples where `span` is `n_pieces` vocabulary pieces drawn
    uniformly (every piece equally often, rare Chinese characters included). The second copy is
    predictable only by in-context copying, for any token. At the demo's scale (300 steps, half
    of the mixture) no copying circuit formed (docs/alignment.md, "Why search stays at 0").
    Deterministic per split."""
    del shuffle_files, seed
    lo, hi = n_pieces

    def gen():
        rng = random.Random(f"copy-{split}")
        while True:
            span = "".join(rng.choices(pieces, k=rng.randint(lo, hi)))
            yield {"text": span + "\n" + span}

    return _from_generator(gen, output_signature={"text": tf.TensorSpec((), tf.string)})


def _with_task_id(task_id: int):
    def fn(ds: tf.data.Dataset) -> tf.data.Dataset:
        return ds.map(lambda ex: {**ex, TASK_ID_FEATURE: tf.constant(task_id, tf.int32)})

    return fn


def _add_weights(ds: tf.data.Dataset) -> tf.data.Dataset:
    return ds.map(add_weights_feature, num_parallel_calls=tf.data.AUTOTUNE)


def _output_features(vocab: seqio.Vocabulary, add_eos: bool) -> dict[str, seqio.Feature]:
    """targets, plus the weights and task id that must survive the task's feature trimming."""
    return {
        "targets": seqio.Feature(vocab, add_eos=add_eos),
        WEIGHTS_FEATURE: seqio.Feature(seqio.PassThroughVocabulary(3), add_eos=False),
        TASK_ID_FEATURE: seqio.Feature(seqio.PassThroughVocabulary(1 << 16), add_eos=False, rank=0, required=False),
    }


def _register_task(name: str, **kwargs) -> seqio.Task:
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(name, **kwargs)


def _register_mixture(name: str, tasks: list[tuple[str, float]]) -> seqio.Mixture:
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, tasks)


def register_pretrain_tasks(
    corpus_dir: str | os.PathLike,
    vocab_path: str | os.PathLike,
    rates: Mapping[str, float] = DEFAULT_PRETRAIN_RATES,
    repeat_rate: float = 0.0,
    repeat_span_chars: tuple[int, int] = (40, 240),
    repeat_shuffle: bool = False,
    copy_rate: float = 0.0,
    copy_pieces_range: tuple[int, int] = (16, 96),
    rate_sample_examples: int = DEFAULT_SAMPLE_EXAMPLES,
    split_documents: bool = True,
    rates_by: str = "tokens",
) -> TokenShareMixture:
    """Registers moss_pretrain_{en,zh,code} over `<corpus_dir>/<lang>.jsonl` and the mixture.

    Each document is tokenized, gets EOS, and is split into chunks of at most the requested
    `targets` length (`token_mixture.split_targets`): no token is trimmed away. `rates` are
    relative TOKEN shares (default 360:100:220, MOSS's token counts): the mixture
    (`token_mixture.TokenShareMixture`) samples each task's examples at its share divided by its
    mean tokens per chunk, estimated from its first `rate_sample_examples` train documents.

    `split_documents=False` trims each document to its first `targets`-length tokens instead
    (the share of tokens kept is estimated from the sample and logged); `rates_by="examples"`
    uses `rates` as plain seqio example rates. Both are for small experiments such as the CPU
    demo (docs/alignment.md), not for pre-training at scale.

    `repeat_rate` > 0 adds `moss_pretrain_repeat` (repeated corpus spans, see `_repeat_dataset`)
    as that fraction of the mixture's tokens: practice in in-context copying, which tool use
    needs (copying an expression or a topic into a command); within the demo's budget it did not
    give the tiny model a copying circuit (docs/alignment.md, "Why search stays at 0").
    `repeat_shuffle` shuffles each span's words before repeating it (see `_repeat_dataset`).
    `copy_rate` > 0 adds `moss_pretrain_copy` (repeated spans of uniformly drawn vocabulary
    pieces, see `_copy_dataset`) as that fraction of the tokens.
    """
    if not 0.0 <= repeat_rate < 1.0:
        raise ValueError(f"repeat_rate must be in [0, 1), got {repeat_rate}")
    if not 0.0 <= copy_rate < 1.0 or repeat_rate + copy_rate >= 1.0:
        raise ValueError(f"copy_rate must be in [0, 1) and repeat_rate + copy_rate < 1, got {copy_rate}, {repeat_rate}")
    vocab = load_vocabulary(vocab_path)
    features = _output_features(vocab, add_eos=True)
    missing = [lang for lang in PRETRAIN_LANGUAGES if not (Path(corpus_dir) / f"{lang}.jsonl").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{corpus_dir}: missing {[m + '.jsonl' for m in missing]} (build them with python -m data_pipelines.corpus)"
        )
    if set(rates) != set(PRETRAIN_LANGUAGES) or any(r <= 0 for r in rates.values()):
        raise ValueError(f"pre-training rates must be positive for exactly {PRETRAIN_LANGUAGES}, got {dict(rates)}")

    def text_task(name: str, dataset_fn, task_id: int) -> None:
        """A pre-training task over a text source: tokenized, EOS after the whole document,
        split into sequence-length chunks, loss weights, task id."""
        _register_task(
            name,
            source=seqio.FunctionDataSource(dataset_fn, splits=("train", "validation")),
            preprocessors=[
                functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
                seqio.preprocessors.tokenize,
                *(
                    [seqio.preprocessors.append_eos, split_targets]
                    if split_documents
                    else [seqio.preprocessors.append_eos_after_trim]
                ),
                _add_weights,
                _with_task_id(task_id),
            ],
            output_features=features,
        )

    for task_id, lang in enumerate(PRETRAIN_LANGUAGES):
        text_task(
            f"moss_pretrain_{lang}", functools.partial(_text_dataset, str(Path(corpus_dir) / f"{lang}.jsonl")), task_id
        )
    mixture = [(f"moss_pretrain_{lang}", float(rates[lang])) for lang in PRETRAIN_LANGUAGES]
    extra = []
    if repeat_rate > 0:
        paths = [str(Path(corpus_dir) / f"{lang}.jsonl") for lang in PRETRAIN_LANGUAGES]
        repeat_fn = functools.partial(_repeat_dataset, paths, tuple(repeat_span_chars), shuffle_units=repeat_shuffle)
        text_task("moss_pretrain_repeat", repeat_fn, len(PRETRAIN_LANGUAGES))
        extra.append(("moss_pretrain_repeat", repeat_rate))
    if copy_rate > 0:
        pieces = copy_pieces(vocab_path)
        if not pieces:
            raise ValueError(f"{vocab_path}: the vocabulary has no ordinary pieces to draw copy spans from")
        copy_fn = functools.partial(_copy_dataset, pieces, tuple(copy_pieces_range))
        text_task("moss_pretrain_copy", copy_fn, len(PRETRAIN_LANGUAGES) + 1)
        extra.append(("moss_pretrain_copy", copy_rate))
    # Token shares are relative: the extra tasks get their fractions of the whole mixture's tokens.
    total = sum(r for _, r in mixture)
    rest = 1.0 - sum(f for _, f in extra)
    mixture += [(name, total * f / rest) for name, f in extra]
    if "moss_pretrain" in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove("moss_pretrain")
    return seqio.MixtureRegistry.add(
        "moss_pretrain",
        mixture,
        mixture_cls=TokenShareMixture,
        sample_examples=rate_sample_examples,
        split=split_documents,
        rates_by=rates_by,
    )


def load_tags(path: str | os.PathLike, num_tags: int = MAX_QUALITY_TAGS) -> dict[tuple[str, int], int]:
    """Reads a tags file: one {"conversation_id": ..., "turn": n, "tag": k} per line.

    Written by the preference-aware `tag` stage (tag k = quantile bucket of the preference
    model's score, 0 = lowest). `num_tags` is the run's K: a tag outside [0, K) is an error.
    Errors name the file and line.
    """
    tags = {}
    for p, lineno, obj in iter_jsonl([path]):
        try:
            key = (str(obj["conversation_id"]), int(obj["turn"]))
            tag = obj["tag"]
            if isinstance(tag, bool) or not isinstance(tag, int):
                raise TypeError(f"tag is {tag!r}, expected an integer")
        except (KeyError, TypeError, ValueError) as e:
            raise DataFormatError(f"{p}:{lineno}: a tag line needs conversation_id, turn and tag ({e!r})") from None
        if not 0 <= tag < num_tags:
            raise DataFormatError(f"{p}:{lineno}: tag {tag} is outside [0, {num_tags}) (this run has {num_tags} tags)")
        if key in tags:
            raise DataFormatError(f"{p}:{lineno}: duplicate tag for conversation {key[0]} turn {key[1]}")
        tags[key] = tag
    return tags


def run_num_tags(tags_file: str | os.PathLike, num_tags: int | None = None) -> int:
    """The run's number of quality tags: `num_tags` when given, else the `num_tags` of the tag
    stage's `preference_tags.json` next to `tags_file` (an error when neither is there)."""
    if num_tags is None:
        meta = Path(tags_file).with_name(PREFERENCE_TAGS_FILE)
        if not meta.is_file():
            raise FileNotFoundError(
                f"{tags_file}: the run's number of tags is unknown: no {meta} (the tag stage writes it next to "
                "tags.jsonl); pass num_tags"
            )
        try:
            num_tags = json.loads(meta.read_text(encoding="utf-8"))["num_tags"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise DataFormatError(f"{meta}: no integer 'num_tags' ({type(e).__name__}: {e})") from None
    if isinstance(num_tags, bool) or not isinstance(num_tags, int) or not 1 <= num_tags <= MAX_QUALITY_TAGS:
        raise ValueError(f"num_tags must be an integer in [1, {MAX_QUALITY_TAGS}], got {num_tags!r}")
    return num_tags


def _encoded_records(paths: Sequence[str], split: str, skip_malformed: bool, encode, task: str) -> Iterator:
    """Runs `encode(record, stats, where)` over the split's JSON lines; malformed lines and
    records raise (naming file and line) or, with `skip_malformed`, are skipped and counted.
    Examples too long (or with nothing to train) are counted by `encode` in the stats; at the end
    of a pass a report naming `task`, the split and the files is logged and the stats kept for
    `task_pass`. The split is by physical line number (`_line_in_split`), so skipping
    moves nothing."""
    stats, counter = conv.ConversionStats(), {}
    for path, lineno, record in iter_jsonl(paths, skip_malformed, counter):
        if not _line_in_split(lineno, split):
            continue
        try:
            encoded = encode(record, stats, f"{path}:{lineno}")
        except conv.ConversationError as e:
            if not skip_malformed:
                raise
            counter["malformed"] = counter.get("malformed", 0) + 1
            log.warning("skipped: %s", e)
            continue
        if encoded is not None:
            yield encoded
    _PASSES[(task, split)] = TaskPass(stats, counter.get("malformed", 0), tuple(paths))
    log.warning(
        "task %s (%s split, %s): %s; %d malformed skipped",
        task,
        split,
        ", ".join(paths),
        stats.report(),
        counter.get("malformed", 0),
    )


def _conversation_dataset(
    task: str,
    paths: Sequence[str],
    vocab_path: str,
    options: conv.MaskOptions,
    max_len: int,
    skip_malformed: bool,
    tags_file: str | None,
    tag_dropout: float,
    tag_seed: int,
    num_tags: int,
    split: str,
    shuffle_files: bool,
    seed: int | None = None,
) -> tf.data.Dataset:
    del shuffle_files, seed

    def gen():
        vocab = load_vocabulary(vocab_path)
        all_tags = load_tags(tags_file, num_tags) if tags_file else None

        def encode(record, stats, where):
            tags = None
            if all_tags is not None:
                cid = record.get("conversation_id", where)
                tags = {}
                for turn in range(1, len(conv.record_turns(record, where)) + 1):
                    if (str(cid), turn) in all_tags:
                        token = conv.tag_for_turn(
                            all_tags[(str(cid), turn)], cid, turn, tag_dropout, tag_seed, num_tags=num_tags
                        )
                        if token is not None:
                            tags[turn] = token
            return conv.encode_conversation(record, vocab, max_len, options, stats, where=where, tags=tags)

        for ids, weights in _encoded_records(paths, split, skip_malformed, encode, task):
            yield {"targets": ids, WEIGHTS_FEATURE: [int(w) + 1 for w in weights]}

    spec = {"targets": tf.TensorSpec((None,), tf.int32), WEIGHTS_FEATURE: tf.TensorSpec((None,), tf.int32)}
    return _from_generator(gen, output_signature=spec)


def register_sft_tasks(
    vocab_path: str | os.PathLike,
    sft_files: Sequence[str | os.PathLike] = (),
    plugin_files: Sequence[str | os.PathLike] = (),
    max_len: int = 2048,
    options: conv.MaskOptions | None = None,
    skip_malformed: bool = False,
    tags_file: str | os.PathLike | None = None,
    tag_dropout: float = 0.1,
    tag_seed: int = 0,
    num_tags: int | None = None,
) -> list[seqio.Task]:
    """Registers moss_sft / moss_sft_plugin over moss-003-sft-data style JSONL files, the
    mixture moss_sft_and_plugin when both are given, and moss_sft_tagged over both when a tags
    file is given (tag after `<|MOSS|>:`, masked from the loss, dropped for a `tag_dropout`
    fraction of turns; tags must be in [0, num_tags), `num_tags` read from the tag stage's
    preference_tags.json next to the tags file when not given).

    moss_sft_and_plugin (MOSS's SFT: the ~1.07M conversations plus the ~300K plugin ones) samples
    each task at a rate equal to its number of train conversation lines, so every conversation
    is seen about equally often, as if the files were one shuffled set (lines counted once, on
    first use, and logged)."""
    options = options or conv.MaskOptions()
    vocab = load_vocabulary(vocab_path)
    features = _output_features(vocab, add_eos=False)  # conversations end with <eom>
    tasks = []
    if not 0.0 <= tag_dropout < 1.0:
        raise ValueError(f"tag_dropout must be in [0, 1), got {tag_dropout}")
    groups = [("moss_sft", list(sft_files), None), ("moss_sft_plugin", list(plugin_files), None)]
    if tags_file is not None:
        if not Path(tags_file).is_file():
            raise FileNotFoundError(f"moss_sft_tagged: tags file {tags_file} does not exist")
        num_tags = run_num_tags(tags_file, num_tags)
        groups.append(("moss_sft_tagged", list(sft_files) + list(plugin_files), str(tags_file)))
    for task_id, (name, files, tags) in enumerate(groups):
        if not files:
            continue
        for f in files:
            if not Path(f).is_file():
                raise FileNotFoundError(f"{name}: {f} does not exist")
        fn = functools.partial(
            _conversation_dataset,
            name,
            [str(f) for f in files],
            str(vocab_path),
            options,
            max_len,
            skip_malformed,
            tags,
            tag_dropout,
            tag_seed,
            num_tags or MAX_QUALITY_TAGS,
        )
        tasks.append(
            _register_task(
                name,
                source=seqio.FunctionDataSource(fn, splits=("train", "validation")),
                preprocessors=[_with_task_id(10 + task_id)],
                output_features=features,
            )
        )
    if SFT_MIXTURE in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(SFT_MIXTURE)
    if sft_files and plugin_files:
        _register_mixture(
            SFT_MIXTURE,
            [
                ("moss_sft", _conversation_count_rate([str(f) for f in sft_files])),
                ("moss_sft_plugin", _conversation_count_rate([str(f) for f in plugin_files])),
            ],
        )
    return tasks


def _conversation_count_rate(files: Sequence[str]):
    """A mixture rate (Task -> float): the number of non-blank train lines in `files`, counted
    on the first call (a pass over the files' bytes, no JSON parsing) and logged."""

    @functools.cache
    def count() -> int:
        n = 0
        for path in files:
            with open(path, "rb") as f:
                n += sum(1 for lineno, line in enumerate(f, 1) if line.strip() and _line_in_split(lineno, "train"))
        return n

    def rate(task: seqio.Task) -> float:
        n = count()
        if not n:
            raise ValueError(f"mixture {SFT_MIXTURE}: task {task.name} has no train conversations in {list(files)}")
        log.warning("mixture %s: %s rate = %d train conversation lines in %s", SFT_MIXTURE, task.name, n, list(files))
        return float(n)

    return rate


PAIR_SIDES = ("chosen", "rejected")


def _pairs_dataset(
    task: str,
    paths: Sequence[str],
    vocab_path: str,
    max_len: int,
    skip_malformed: bool,
    split: str,
    shuffle_files: bool,
    seed: int | None = None,
) -> tf.data.Dataset:
    del shuffle_files, seed

    def gen():
        vocab = load_vocabulary(vocab_path)

        def encode(record, stats, where):
            return conv.encode_pair(record, vocab, max_len, stats=stats, where=where)

        for pair in _encoded_records(paths, split, skip_malformed, encode, task):
            out = {}
            for side in PAIR_SIDES:
                ids, weights = pair[side]
                out[side] = ids
                out[f"{side}_{WEIGHTS_FEATURE}"] = [int(w) + 1 for w in weights]
            yield out

    spec = {k: tf.TensorSpec((None,), tf.int32) for side in PAIR_SIDES for k in (side, f"{side}_{WEIGHTS_FEATURE}")}
    return _from_generator(gen, output_signature=spec)


def register_preference_pairs_task(
    vocab_path: str | os.PathLike,
    pair_files: Sequence[str | os.PathLike],
    max_len: int = 2048,
    skip_malformed: bool = False,
) -> seqio.Task:
    """Registers moss_preference_pairs (chosen/rejected replies sharing a context) for the
    preference model and DPO; see `conversation.encode_pair` for the record layout."""
    vocab = load_vocabulary(vocab_path)
    for f in pair_files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"moss_preference_pairs: {f} does not exist")
    weights = seqio.Feature(seqio.PassThroughVocabulary(3), add_eos=False)
    features = {side: seqio.Feature(vocab, add_eos=False) for side in PAIR_SIDES}
    features.update({f"{side}_{WEIGHTS_FEATURE}": weights for side in PAIR_SIDES})
    fn = functools.partial(
        _pairs_dataset, "moss_preference_pairs", [str(f) for f in pair_files], str(vocab_path), max_len, skip_malformed
    )
    return _register_task(
        "moss_preference_pairs",
        source=seqio.FunctionDataSource(fn, splits=("train", "validation")),
        output_features=features,
    )
