"""TFDS builders for local files (manual directory; nothing is downloaded).

- `moss_sft_conversations`: moss-003-sft-data style conversations, one JSON object per line in
  `*.jsonl` / `*.json` files of the manual directory and its subdirectories (the released data
  ships as JSON lines); a record without a `conversation_id` gets "<path under the manual
  directory>:<line>".
- `local_text_corpus`: a text corpus from `*.txt`, `*.md`, `*.py` files (one document per
  file) and `*.jsonl` files (one {"text": ...} document per line).

    builder = MossSftConversations(data_dir="~/tensorflow_datasets")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir="path/to/files"))
    ds = builder.as_dataset(split="train")

A malformed line (bad UTF-8 or JSON, a conversation whose `chat` is not turn_1..N objects or
whose `num_turns` is not that N) is an error naming the file and line; with the `skip_malformed` config
(`MossSftConversations(config="skip_malformed")`) it is skipped, logged, and counted in the
dataset's metadata (`builder.info.metadata["malformed_lines"]`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import conversation as conv
from data_pipelines.jsonl import iter_jsonl

log = logging.getLogger(__name__)


class _Config(tfds.core.BuilderConfig):
    def __init__(self, *, skip_malformed: bool, **kwargs):
        super().__init__(**kwargs)
        self.skip_malformed = skip_malformed


_CONFIGS = [
    _Config(name="strict", skip_malformed=False, description="malformed lines are errors"),
    _Config(name="skip_malformed", skip_malformed=True, description="malformed lines are skipped and counted"),
]


def _files(manual_dir: Path, patterns: tuple[str, ...]) -> list[Path]:
    files = sorted(p for pattern in patterns for p in Path(manual_dir).rglob(pattern) if p.is_file())
    if not files:
        raise FileNotFoundError(f"{manual_dir}: no files matching {patterns} in the manual directory")
    return files


class _JsonLinesMixin:
    def _json_lines(self, path: Path):
        counter = {}
        for _, lineno, obj in iter_jsonl(
            [path], skip_malformed=self.builder_config.skip_malformed, counter=counter, check=self._check
        ):
            yield lineno, obj
        self._malformed += counter.get("malformed", 0)

    def _record_skipped(self) -> None:
        self.info.metadata["malformed_lines"] = self._malformed
        if self._malformed:
            log.warning("%s: %d malformed line(s) skipped", self.name, self._malformed)


class MossSftConversations(_JsonLinesMixin, tfds.core.GeneratorBasedBuilder):
    """moss-003-sft-data style multi-turn conversations from local JSON-lines files."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = _CONFIGS
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the conversation files (JSON lines, e.g. moss-003-sft-data or moss-003-sft-plugin-data) in "
        "the manual directory."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "conversation_id": tfds.features.Text(),
                    "meta_instruction": tfds.features.Text(),
                    "num_turns": tfds.features.Scalar(dtype=np.int32),
                    "category": tfds.features.Text(),
                    "chat_json": tfds.features.Text(),  # {"turn_1": {...}, ...} as JSON, fields vary by source
                }
            ),
            metadata=tfds.core.MetadataDict(),
        )

    def _check(self, obj) -> str | None:
        """The record's layout (`chat` turn_1..N objects, an integer `num_turns` equal to N, a
        string meta instruction); the fields inside turns are checked when they are encoded."""
        try:
            conv.record_turns(obj, where=f"conversation {obj.get('conversation_id', '?')}")
        except conv.ConversationError as e:
            return str(e)
        if not isinstance(obj.get("meta_instruction", ""), str):
            return "'meta_instruction' is not a string"
        return None

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        files = _files(dl_manager.manual_dir, ("*.jsonl", "*.json"))
        return {"train": self._generate_examples(files, Path(dl_manager.manual_dir))}

    def _generate_examples(self, files, manual_dir: Path):
        self._malformed = 0
        for path in files:
            # Keyed by the path under the manual directory: files in different subdirectories
            # may share a name.
            name = path.relative_to(manual_dir).as_posix()
            for lineno, obj in self._json_lines(path):
                yield (
                    f"{name}:{lineno}",
                    {
                        "conversation_id": str(obj.get("conversation_id", f"{name}:{lineno}")),
                        "meta_instruction": obj.get("meta_instruction", ""),
                        "num_turns": int(obj.get("num_turns", len(obj["chat"]))),
                        "category": str(obj.get("category", "")),
                        "chat_json": json.dumps(obj["chat"], ensure_ascii=False),
                    },
                )
        self._record_skipped()


class LocalTextCorpus(_JsonLinesMixin, tfds.core.GeneratorBasedBuilder):
    """Documents from local text files (one per file) and JSON lines ({"text": ...} per line)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = _CONFIGS
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put .txt/.md/.py files and/or .jsonl files with a 'text' field in the manual dir."

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "source": tfds.features.Text()}),
            metadata=tfds.core.MetadataDict(),
        )

    def _check(self, obj) -> str | None:
        if not isinstance(obj.get("text"), str):
            return "not a JSON object with a string 'text' field"
        return None

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        files = _files(dl_manager.manual_dir, ("*.txt", "*.md", "*.py", "*.jsonl"))
        return {"train": self._generate_examples(files)}

    def _generate_examples(self, files):
        self._malformed = 0
        for path in files:
            if path.suffix == ".jsonl":
                for lineno, obj in self._json_lines(path):
                    yield f"{path}:{lineno}", {"text": obj["text"], "source": f"{path}:{lineno}"}
            else:
                try:
                    text = path.read_text(encoding="utf-8")
                except UnicodeDecodeError as e:
                    if not self.builder_config.skip_malformed:
                        raise ValueError(f"{path}: not UTF-8 text ({e})") from e
                    self._malformed += 1
                    log.warning("%s: skipped: not UTF-8 text", path)
                    continue
                yield str(path), {"text": text, "source": str(path)}
        self._record_skipped()
